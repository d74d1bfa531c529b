"""sCT and sCD (Lu & Song 2024; papers.md §5): the TrigFlow model, the JVP, the teacher velocity, the loss
against a recomputation from its definition, its gradient, and learning the Gaussian consistency map."""

import pytest
import torch

from cmbench import losses
from cmbench.nets import build_model
from cmbench.config import ConfigError, Experiment
from cmbench.data.toy import Gaussian
from cmbench.losses.scm import tangent_jvp, teacher_velocity
from cmbench.nets.mlp import MLP
from cmbench.nets.precond import TrigFlow
from cmbench.teacher import AnalyticTeacher
from cmbench.checks import check_run
from conftest import REPO

SD = 0.5
MEAN, STD = [0.3, -0.2], 0.5          # a 2-D Gaussian, so per-sample norms run over more than one dimension


def trigflow64(seed: int, dim: int = 2) -> TrigFlow:
    torch.manual_seed(seed)
    return TrigFlow(MLP(dim, 16, 2, 8, 4.0).double(), SD)


def resolve(variant: str, **overrides):
    return Experiment(REPO / "configs").resolve("toy", "gauss1d", variant, 0, overrides)


def build_loss(variant: str, **loss):
    cfg = resolve(variant, dataset={"dim": 2, "mean": MEAN}, loss={"name": variant, **loss})
    teacher = AnalyticTeacher(cfg) if variant == "scd" else None
    return losses.build(cfg, teacher, build_model(cfg))


def test_trigflow_boundary_and_sigma_space():
    f = trigflow64(0)
    x = torch.randn(64, 2, dtype=torch.float64) * 3
    assert torch.equal(f.consistency(x, torch.zeros(64, dtype=torch.float64)), x)     # f(x, 0) = x exactly
    assert torch.equal(f(x, torch.tensor(0.0, dtype=torch.float64)), x)
    assert torch.allclose(f(x, torch.tensor(1e-6, dtype=torch.float64)), x, atol=1e-5)
    # σ-space forward is the t-space model at t = arctan(σ/σ_d), x_t = cos t·x_σ
    sigma = torch.tensor([0.002, 0.3, 1.0, 80.0], dtype=torch.float64).repeat(16)
    t = torch.atan(sigma / SD)
    assert torch.allclose(f(x, sigma), f.consistency(t.cos()[:, None] * x, t), rtol=1e-14, atol=1e-14)


def test_jvp_is_the_directional_derivative_along_the_ode():
    f = trigflow64(1, dim=3)
    x_t = torch.randn(5, 3, dtype=torch.float64)
    t = torch.linspace(0.1, 1.4, 5, dtype=torch.float64)
    dxt_dt = torch.randn(5, 3, dtype=torch.float64)
    with torch.no_grad():
        f_minus, jvp = tangent_jvp(f, x_t, t, dxt_dt)
        h = 1e-5
        fd = (f.raw(x_t + h * dxt_dt, t + h) - f.raw(x_t - h * dxt_dt, t - h)) / (2 * h)
    expected = (t.cos() * t.sin() * SD)[:, None] * fd          # cos t·sin t·σ_d·dF/dt
    assert torch.equal(f_minus, f.raw(x_t, t).detach())
    assert ((jvp - expected).norm() / expected.norm()).item() < 1e-4


def gaussian_velocity(x, t):
    """E[dx_t/dt | x_t = x] for data N(μ, s²I) under TrigFlow noising (papers.md §8.2)."""
    mu, cos, sin = torch.tensor(MEAN, dtype=torch.float64), t.cos()[:, None], t.sin()[:, None]
    v = cos**2 * STD**2 + sin**2 * SD**2
    dv = 2 * sin * cos * (SD**2 - STD**2)
    return -mu * sin + dv / (2 * v) * (x - mu * cos)


def test_teacher_velocity_matches_gaussian_closed_form():
    dist = Gaussian(MEAN, STD)
    t = torch.linspace(0.01, 1.56, 50, dtype=torch.float64)
    x_t = torch.tensor(MEAN, dtype=torch.float64) * t.cos()[:, None] + torch.randn(50, 2, dtype=torch.float64)
    denoise = lambda x, sigma, labels=None: torch.from_numpy(dist.denoiser(x.numpy(), sigma.numpy()))
    v = teacher_velocity(denoise, x_t, t, SD)
    assert (v - gaussian_velocity(x_t, t)).abs().max().item() < 1e-10


# three fixed points; t spans near-clean, middle and near-prior
X0 = torch.tensor([[0.1, 0.7], [-0.4, 0.2], [0.9, -0.5]], dtype=torch.float64)
Z = SD * torch.tensor([[0.5, -1.2], [1.5, 0.3], [-0.8, 0.9]], dtype=torch.float64)
T = torch.tensor([0.05, 0.7, 1.5], dtype=torch.float64)


def reference_g(target, variant, r):
    """g of Alg. 1 rebuilt from f itself: cos t·df⁻/dt by a central difference of f_θ⁻ along the ODE for the
    part warmed up by r, and −cos²t·(σ_d F⁻ − dx_t/dt) for the rest; then normalised with c = 0.1."""
    cos, sin = T.cos()[:, None], T.sin()[:, None]
    x_t = cos * X0 + sin * Z
    dxt_dt = cos * Z - sin * X0 if variant == "sct" else gaussian_velocity(x_t, T)
    h = 1e-6
    with torch.no_grad():
        df_dt = (target.consistency(x_t + h * dxt_dt, T + h) - target.consistency(x_t - h * dxt_dt, T - h)) / (2 * h)
        g0 = -cos**2 * (SD * target.raw(x_t, T) - dxt_dt)
    g = g0 + r * (cos * df_dt - g0)
    return x_t, g / (g.norm(dim=1, keepdim=True) + 0.1)


@pytest.mark.parametrize("variant", ["sct", "scd"])
@pytest.mark.parametrize("step", [50, 100, 5000])     # r = 0.25, 0.5, 1 with H = 200
def test_loss_matches_its_definition(variant, step):
    loss = build_loss(variant, warmup=200)
    loss.module.double()
    torch.manual_seed(2)
    for p in loss.module.parameters():             # a non-trivial w_φ(t)
        torch.nn.init.normal_(p, std=0.5)
    model, target = trigflow64(3), trigflow64(4)   # a separate θ⁻ so that F_θ − F⁻ is not zero
    x_t, g = reference_g(target, variant, min(1.0, step / 200))
    with torch.no_grad():
        w = loss.module(T)
        expected = w.exp() / 2 * (model.raw(x_t, T) - target.raw(x_t, T) - g).square().sum(1) - w
        got = loss.loss_at(model, target, X0, Z, T, step)
    assert torch.allclose(got, expected, rtol=1e-7, atol=1e-9), (got, expected)
    assert loss.stats(step) == {"tangent_warmup": min(1.0, step / 200)}


def test_gradient_at_theta_minus_is_the_tangent_one():
    """Eq. 8: at θ = θ⁻ the θ-gradient is −(2/D)·Σ g·∂F_θ/∂θ (no gradient through F⁻ or the JVP)."""
    loss = build_loss("sct", warmup=0, adaptive_weighting=False)
    assert loss.module is None
    model = trigflow64(5)
    params = list(model.parameters())
    got = torch.autograd.grad(loss.loss_at(model, model, X0, Z, T, 0).sum(), params)
    x_t, g = reference_g(model, "sct", 1.0)
    expected = torch.autograd.grad((-2 / 2 * g * model.raw(x_t, T)).sum(), params)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-10)


def test_randomness_comes_from_the_generator_only():
    loss, model = build_loss("sct"), TrigFlow(MLP(2, 16, 2, 8, 4.0), SD)
    x0 = torch.randn(8, 2)
    state = torch.get_rng_state()
    a = loss(model, model, x0, 0, torch.Generator().manual_seed(7))
    b = loss(model, model, x0, 0, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (8,)
    assert torch.equal(torch.get_rng_state(), state)


def test_warmup_zero_means_full_tangent():
    assert build_loss("sct", warmup=0).stats(0) == {"tangent_warmup": 1.0}


def test_config_checks():
    with pytest.raises(ConfigError, match="trigflow"):
        losses.check(resolve("sct", precond={"name": "cm"}))
    cfg = resolve("scd")
    with pytest.raises(ConfigError, match="teacher"):
        losses.check(cfg.model_copy(update={"teacher": None}))
    cfg = resolve("sct", teacher={"source": "analytic"})
    assert losses.build(cfg, model=build_model(cfg)).teacher is None   # allowed, unused
    assert check_run(resolve("sct")).loss["tangent_c"] == 0.1


def test_adaptive_weight_is_sized_by_the_network():
    """w_φ(t)'s time features are the network's own (nets' noise_features), not read from the toy MLP's config."""
    cfg = resolve("sct", net={"name": "mlp", "emb_features": 6, "emb_max_freq": 2.0})
    w = losses.build(cfg, model=build_model(cfg)).module
    assert w.embed.freqs.numel() == 3 and w.embed.freqs.max().item() == pytest.approx(2.0)
    unet = build_model(Experiment(REPO / "configs").resolve("cifar10", "cifar10", "sct", 0, scale="smoke"))
    assert unet.net.noise_features == (64, 16.0)
    with pytest.raises(ValueError, match="sized by the network"):
        losses.build(cfg)
