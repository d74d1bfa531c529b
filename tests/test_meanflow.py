"""MeanFlow (new-methods.md §1): the loss with the exact Gaussian average velocity inside (§1.8a), its weighting and
(r, t) sampler by hand, the JVP against finite differences (§1.8b), and a short toy run against u* (§1.8c)."""
import json
import math

import pytest
import torch
from torch import nn

import gaussian_truth as gt
from cmbench import checkpoint, losses, paths
from cmbench.checks import check_run
from cmbench.config import ConfigError, Experiment, FlowMapSpec
from cmbench.draws import Draws
from cmbench.losses.meanflow import average_velocity_and_derivative, sample_times
from cmbench.metrics.evaluate import W2, evaluate_run
from cmbench.nets import build_model
from cmbench.nets.mlp import MLP
from cmbench.nets.precond import FlowMap
from cmbench.sample import sample_run
from cmbench.train import flops, loop
from conftest import REPO
from test_flowmap import ExactVelocity


def resolve(**overrides):
    return Experiment(REPO / "configs").resolve("toy", "gauss1d", "meanflow", 0, overrides)


def build_loss(**loss):
    return losses.build(resolve(loss={"name": "meanflow", **loss}))


def exact_residual(r, t, n=50_000):
    """Δ = u* − u_tgt of the real loss code at fixed (r, t), with u* of N(0.3, 0.5²) as the net (float64)."""
    g = torch.Generator().manual_seed(0)
    x0 = gt.MU + gt.S * torch.randn(n, 1, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 1, generator=g, dtype=torch.float64)
    full = lambda v: torch.full((n,), v, dtype=torch.float64)
    model = FlowMap(ExactVelocity(), FlowMapSpec(), 0.5)
    return build_loss().residual(model, x0, eps, full(r), full(t)).squeeze(1)


# (r, t): §0.4 checks the first two by Monte Carlo; the last is where the flow-map sampler starts
PAIRS = [(0.2, 0.8), (0.6, 0.6), (0.0, 80 / 81)]


@pytest.mark.parametrize("r,t", PAIRS)
def test_exact_average_velocity_is_a_stationary_point_with_the_closed_form_floor(r, t):
    """At u = u* the residual has mean 0 and mean square s²V_r/V_t² (new-methods.md §0.3, §1.8a): the JVP's
    tangent, the sign of t − r and the net's time inputs are wired right."""
    delta, floor = exact_residual(r, t), gt.S**2 * gt.std(r) ** 2 / gt.std(t) ** 4
    n = delta.numel()
    assert abs(delta.mean().item()) < 4 * math.sqrt(floor / n)
    assert delta.square().mean().item() == pytest.approx(floor, rel=5 * math.sqrt(2 / n))


@pytest.mark.parametrize("wrong", [lambda v, dr, dt: (torch.zeros_like(v), dr, dt),       # no v·∂_z u
                                   lambda v, dr, dt: (v, torch.ones_like(dr), dt)],         # r moved with t
                         ids=["no-z-tangent", "r-tangent-1"])
def test_a_wrong_tangent_breaks_the_stationary_point(monkeypatch, wrong):
    """The check above has power: the same code with another JVP tangent (Table 1b's failure) misses it."""
    jvp = torch.func.jvp
    monkeypatch.setattr(torch.func, "jvp", lambda f, primals, tangents: jvp(f, primals, wrong(*tangents)))
    delta, floor = exact_residual(0.2, 0.8), gt.S**2 * gt.std(0.2) ** 2 / gt.std(0.8) ** 4
    off_mean = abs(delta.mean().item()) / math.sqrt(floor / delta.numel())
    off_square = abs(delta.square().mean().item() / floor - 1) / math.sqrt(2 / delta.numel())
    assert max(off_mean, off_square) > 20, (off_mean, off_square)


class Linear(nn.Module):
    """u = a·z + b·t + c·(t − r): du/dt along (v, 0, 1) is a·v + b + c."""

    def forward(self, z, c1, labels=None, c2=None):
        return 2 * z + 3 * c1[:, None] - 5 * c2[:, None]


def test_target_and_adaptive_weight_by_hand():
    """Δ = u − (v − (t − r)·du/dt) with a linear net, and ℓ/(ℓ + c)^p with ℓ summed over dimensions: p = ½,
    c = 11 make ℓ + c a square (25 + 11 = 36, 5 + 11 = 16). Its gradient is 2Δ/(ℓ + c)^p: the weight is stopped."""
    loss = build_loss(p=0.5, c=11.0)
    x0, eps = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    r, t = torch.tensor([0.25], dtype=torch.float64), torch.tensor([0.75], dtype=torch.float64)
    # z = 0.25·x0 + 0.75·ε = (0.25, 1.5), v = ε − x0 = (−1, 2); u = 2z + 3·0.75 − 5·0.5 = (0.25, 2.75);
    # du/dt = 2v + 3 − 5 = (−4, 2); u_tgt = v − 0.5·du/dt = (1, 1); Δ = (−0.75, 1.75)
    delta = loss.residual(FlowMap(Linear(), FlowMapSpec(), 0.5), x0, eps, r, t)
    torch.testing.assert_close(delta, torch.tensor([[-0.75, 1.75]], dtype=torch.float64), rtol=0, atol=1e-15)
    d = torch.tensor([[3.0, 4.0], [1.0, 2.0]], requires_grad=True)
    value = loss.weighted(d)
    torch.testing.assert_close(value, torch.tensor([25 / 6, 5 / 4]))
    (grad,) = torch.autograd.grad(value.sum(), d)
    torch.testing.assert_close(grad, torch.tensor([[1.0, 4 / 3], [0.5, 1.0]]))
    assert build_loss(p=0.0).weighted(d).tolist() == [25.0, 5.0]        # p = 0: plain summed squares


def draw_times(**loss):
    n = 200_000
    return sample_times(build_loss(**loss).params, Draws(torch.Generator().manual_seed(1), n),
                        torch.zeros(n, 1, dtype=torch.float64))


def test_time_samplers_r_ne_t_fractions_and_medians():
    """v0: max and min of two LN(−2, 2) draws, r = t with probability 1 − ratio: P(r < t) = ratio, median t =
    sigmoid(−2 + 2Φ⁻¹(√½)) = 0.2871. v1: r = t with probability 1 − ratio, then r = min(t, r):
    P(r < t) = ratio·P(logit r < logit t) = 0.75·Φ(3.4/(1.6√2)) = 0.7002, median t = sigmoid(−0.6) = 0.3543."""
    normal = torch.distributions.Normal(0.0, 1.0)
    t, r = draw_times()
    assert bool((r <= t).all()) and bool((t > 0).all()) and bool((t < 1).all())
    assert (r < t).double().mean().item() == pytest.approx(0.75, abs=0.005)
    assert t.median().item() == pytest.approx(torch.sigmoid(-2 + 2 * normal.icdf(torch.tensor(0.5**0.5))).item(),
                                              abs=0.005)
    t, r = draw_times(time_sampler="v1", p_mean_t=-0.6, p_std_t=1.6, p_mean_r=-4.0, p_std_r=1.6)
    assert bool((r <= t).all())
    assert (r < t).double().mean().item() == pytest.approx(
        0.75 * normal.cdf(torch.tensor(3.4 / (1.6 * 2**0.5))).item(), abs=0.005)
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(0.6)), abs=0.005)
    for sampler in ("v0", "v1"):
        t, r = draw_times(time_sampler=sampler, ratio=0.0)
        assert torch.equal(t, r)                                              # ratio 0: flow matching only


def mlp_flowmap(seed=0):
    torch.manual_seed(seed)
    return FlowMap(MLP(2, 16, 2, 8, 4.0, time2="concat").double(), FlowMapSpec(), 0.5)


def test_jvp_matches_central_differences_along_the_flow():
    """du/dt from the JVP is the central difference of u(z + hv, r, t + h) in float64, h = 1e-4 (§1.8b), and
    the primal is u itself."""
    model, g = mlp_flowmap(), torch.Generator().manual_seed(2)
    z, v = (torch.randn(16, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(16, generator=g, dtype=torch.float64)
    u, dudt = average_velocity_and_derivative(model, z, r, t, v)
    h = 1e-4
    with torch.no_grad():
        fd = (model.u(z + h * v, r, t + h) - model.u(z - h * v, r, t - h)) / (2 * h)
        assert torch.equal(u, model.u(z, r, t))
    assert ((dudt - fd).norm() / fd.norm()).item() < 1e-7


class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.drop, self.outer = nn.Linear(4, 32), nn.Dropout(0.5), nn.Linear(32, 2)

    def forward(self, z, c1, labels=None, c2=None):
        return self.outer(self.drop(torch.tanh(self.inner(torch.cat([z, c1[:, None], c2[:, None]], dim=1)))))


def test_u_and_its_derivative_share_one_dropout_mask():
    """One JVP pass gives u and du/dt (new-methods.md §1.9): du/dt is the derivative of the very masked network that
    gave u — the central difference of the same-seeded network — and not of a network with other masks."""
    torch.manual_seed(0)
    model = FlowMap(DropoutNet().double().train(), FlowMapSpec(), 0.5)
    g = torch.Generator().manual_seed(4)
    z, v = (torch.randn(64, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(64, generator=g, dtype=torch.float64)

    def seeded(seed, dz, dt):
        torch.manual_seed(seed)
        return model.u(z + dz * v, r, t + dt)

    torch.manual_seed(5)
    u, dudt = average_velocity_and_derivative(model, z, r, t, v)
    h = 1e-5
    with torch.no_grad():
        assert torch.equal(u, seeded(5, 0, 0))
        fd = (seeded(5, h, h) - seeded(5, -h, -h)) / (2 * h)
        other = (seeded(6, h, h) - seeded(6, -h, -h)) / (2 * h)
    assert ((dudt - fd).norm() / fd.norm()).item() < 1e-7
    assert ((dudt - other).norm() / fd.norm()).item() > 0.1


def test_gradient_flows_through_u_only():
    """The θ-gradient of the loss is that of Σ w·2Δ·u_θ with Δ and w = (ℓ + c)^−p held fixed (target stopped)."""
    model, loss = mlp_flowmap(1), build_loss()
    g = torch.Generator().manual_seed(3)
    x0, eps = (torch.randn(8, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.rand(8, generator=g, dtype=torch.float64)
    r = t * torch.rand(8, generator=g, dtype=torch.float64)
    params = list(model.parameters())
    got = torch.autograd.grad(loss.weighted(loss.residual(model, x0, eps, r, t)).sum(), params)
    with torch.no_grad():
        delta = loss.residual(model, x0, eps, r, t)
        w = (delta.square().sum(1) + loss.params.c) ** -loss.params.p
    u = model.u((1 - t[:, None]) * x0 + t[:, None] * eps, r, t)
    expected = torch.autograd.grad((w[:, None] * 2 * delta * u).sum(), params)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_config_checks():
    with pytest.raises(ConfigError, match="flowmap.output 'velocity'"):
        losses.check(resolve(precond={"flowmap": {"output": "trigflow"}}))
    with pytest.raises(ConfigError, match="flowmap.path 'fm'"):
        losses.check(resolve(precond={"flowmap": {"path": "fm_sd"}}))
    with pytest.raises(ConfigError, match="needs precond 'flowmap'"):
        losses.check(resolve(precond={"name": "cm", "flowmap": None}, net={"time2": "none"},
                             sample={"sampler": "consistency"}))
    with pytest.raises(ConfigError, match="time_sampler"):
        build_loss(time_sampler="v2")


def test_training_flops_count_one_jvp_and_the_backward_of_u():
    """5 forward passes per sample (cmbench.train.flops) of the two-time MLP, counted by hand: 2·in·out per linear
    layer, the input being z and both times' sin/cos features."""
    cfg = check_run(resolve())
    n = cfg.net
    widths = [1 + 2 * n.emb_features] + [n.width] * n.depth + [1]
    per_forward = sum(2 * a * b for a, b in zip(widths, widths[1:]))
    assert flops.flops_per_step(cfg, build_model(cfg), None, "cpu") == 5 * per_forward * cfg.train.batch


# Learning test: gauss1d, 1500 steps (~10 s on an idle core), EMA 0.99 (calibration.md: a short run needs a short
# EMA), seed 0. Measured at seeds 0 / 1 (p 0) and seed 0 (p 0.75) on a loaded machine: |u_θ − u*| over the grid
# below mean 0.052 / 0.050 / 0.070, max 0.33 / 0.36 / 0.43 (largest at ±2 std and t near 1, where the v0 sampler
# rarely draws t); 1-step W2 0.094 / 0.080 / 0.071 (floor 0.0056). The untrained net: mean 0.72, max 2.34. Bounds
# ≈ 2× the worst.
STEPS, EMA = 1500, 0.99


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    results = tmp_path_factory.mktemp("meanflow")
    cfg = check_run(resolve(train={"steps": STEPS, "ema_decay": EMA, "checkpoint_every": STEPS}))
    rdir = paths.run_dir(results, cfg.run)
    loop.train(cfg, rdir, progress=False)
    return cfg, rdir, results


def test_learned_average_velocity_approaches_the_exact_one(trained):
    """u_θ(z, r, t) against u* on r ≤ t of an 11 × 11 time grid (r = t: the velocity v) × z within ±2 std of p_t."""
    cfg, rdir, _ = trained
    model = build_model(cfg)
    model.load_state_dict(checkpoint.load(paths.final_weights(rdir))["ema"])
    grid = torch.linspace(0, 1, 11)
    t, r = (x.reshape(-1) for x in torch.meshgrid(grid, grid, indexing="ij"))
    t, r = t[r <= t], r[r <= t]
    err = []
    for zs in torch.linspace(-2, 2, 9):
        z = gt.mean(t) + gt.std(t) * zs
        with torch.no_grad():
            err.append((model.u(z[:, None], r, t).squeeze(1) - gt.average_velocity(z, r, t)).abs())
    err = torch.cat(err)
    assert err.mean().item() < 0.15 and err.max().item() < 0.9, (err.mean().item(), err.max().item())


def test_one_step_samples_match_the_data_law(trained):
    """1-step samples of the flow-map sampler (x_T = 80ε, one jump to σ = 0) against N(0.3, 0.5²)."""
    _, rdir, results = trained
    sample_run(rdir, 1)
    w2 = {r["metric"]: r for r in json.loads(evaluate_run(rdir, 1, results).read_text())}[W2]
    assert w2["value"] < 0.2, w2
