"""IMM (cmbench/losses/imm.py; new-methods.md §4): the MMD², kernel, weight and r(s, t) by hand; with IMM's exact
F* inside FlowMap, the loss's two particle sets have the target law N(m_s, V_s); a short toy run learns that law."""
import math

import pytest
import torch

import gaussian_truth as gt
from cmbench import losses
from cmbench.checks import check_run
from cmbench.config import ConfigError, Experiment, FlowMapSpec
from cmbench.draws import Draws
from cmbench.losses.imm import kernel_width, mapping_r, mmd2, time_weight
from cmbench.nets.precond import FlowMap
from conftest import REPO

SIGMA_D = 0.5
FLOOR = 1e-4      # √(1e-8): the kernel's distance floor on the diagonal


def test_mmd2_of_two_particles_by_hand():
    """M = 2, D = 2, w̃ = 2: k(a, b) = exp(−2·‖a − b‖/2) = exp(−‖a − b‖) off the diagonal, exp(−1e-4) on it."""
    y = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]], dtype=torch.float64)
    y_tilde = torch.tensor([[[0.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    diag = math.exp(-FLOOR)
    k_yy = (2 * diag + 2 * math.exp(-5)) / 4                      # ‖y1 − y2‖ = 5
    k_tt = (2 * diag + 2 * math.exp(-1)) / 4                      # ‖ỹ1 − ỹ2‖ = 1
    k_yt = (diag + math.exp(-1) + math.exp(-5) + math.exp(-math.sqrt(18))) / 4   # pairs (y_j, ỹ_k): 0, 1, 5, √18
    got = mmd2(y, y_tilde, torch.tensor([2.0], dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor([k_yy + k_tt - 2 * k_yt], dtype=torch.float64), rtol=0, atol=1e-15)


def test_mmd2_of_one_particle_is_two_minus_twice_the_kernel():
    """M = 1 (new-methods.md §4.9): 2 − 2k(y, ỹ), consistency training with a Laplace-shaped metric (up to the
    1e-8 floor on the diagonal)."""
    y, y_tilde = torch.tensor([[[0.7]], [[-1.0]]], dtype=torch.float64), torch.tensor([[[0.2]], [[-1.0]]], dtype=torch.float64)
    width = torch.tensor([3.0, 3.0], dtype=torch.float64)
    got = mmd2(y, y_tilde, width)
    want = torch.tensor([2 - 2 * math.exp(-3 * 0.5), 0.0], dtype=torch.float64)
    torch.testing.assert_close(got, want + 2 * (math.exp(-3 * FLOOR) - 1) * torch.tensor([1.0, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)


def test_weight_and_kernel_width_by_hand():
    """w(s, t) = ½·sigmoid(b − λ_t)·2/(t(1 − t))·α_t^a/(α_t² + t²) with λ_t = 2 ln((1 − t)/t), a = 2, b = 4;
    w̃ = 1/|c_out(s, t)| = √(α_t² + t²)/((t − s)·σ_d)."""
    t = torch.tensor([0.5, 0.2], dtype=torch.float64)
    sig = lambda v: 1 / (1 + math.exp(-v))   # noqa: E731
    want = [0.5 * sig(4) * 8 * 0.25 / 0.5,                                  # λ = 0, 2/(¼) = 8, α² = ¼, ρ² = ½
            0.5 * sig(4 - 2 * math.log(4)) * 12.5 * 0.64 / 0.68]           # λ = 2 ln 4, 2/0.16, α² = 0.64
    torch.testing.assert_close(time_weight(t, 2.0, 4.0), torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    s = torch.tensor([0.1, 0.05], dtype=torch.float64)
    torch.testing.assert_close(kernel_width(s, t, SIGMA_D),
                               torch.tensor([math.sqrt(0.5) / 0.2, math.sqrt(0.68) / 0.075], dtype=torch.float64))


def test_a_time_gap_lost_to_rounding_gives_the_limit_not_nan():
    """s one float32 ulp below t (ring2d toy run, step 2224): c_out rounds to 0. The group's loss and gradient take
    the s → t limit, 0, instead of NaN."""
    t = torch.tensor([0.048858460038900375])
    s = torch.nextafter(t, torch.zeros(1))
    y = torch.tensor([[[0.1, 0.2], [0.3, -0.1]]], requires_grad=True)
    value = mmd2(y, torch.tensor([[[0.0, 0.2], [0.3, 0.0]]]), kernel_width(s, t, SIGMA_D))
    value.sum().backward()
    assert value.item() == 0 and torch.equal(y.grad, torch.zeros_like(y))


def test_r_is_a_constant_eta_step_below_t_clipped_at_s():
    """t ∈ [0, 0.8] (η_max = 4, η_min = 0), k = 2: Δη = 1. t = 0.75 (η 3) → η 2, r = ⅔; t = 0.6 (η 1.5) → η ½,
    r = ⅓, or s = 0.4 where that is above; t = 0.5 (η 1) → η 0: r = s."""
    s = torch.tensor([0.1, 0.1, 0.4, 0.3], dtype=torch.float64)
    t = torch.tensor([0.75, 0.6, 0.6, 0.5], dtype=torch.float64)
    torch.testing.assert_close(mapping_r(s, t, 0.0, 0.8, 2),
                               torch.tensor([2 / 3, 1 / 3, 0.4, 0.3], dtype=torch.float64), rtol=0, atol=1e-15)


class ExactTrigFlow(torch.nn.Module):
    """IMM's F* = (f* − c_skip·z)/c_out of N(0.3, 0.5²) (new-methods.md §4.9; tests/test_flowmap.py), with the
    identity map (F* = 0) where s = t, which r(s, t) = s reaches."""

    def forward(self, u, c1, labels=None, c2=None):
        t, s = c1[:, None], c2[:, None]
        rho = ((1 - t) ** 2 + t**2) ** 0.5
        z = u * SIGMA_D * rho
        c_skip, out = ((1 - t) * (1 - s) + t * s) / rho**2, -((1 - s) * t - (1 - t) * s) * SIGMA_D / rho
        safe = torch.where(out != 0, out, torch.ones_like(out))
        return torch.where(out != 0, (gt.flow(z, t, s, nu=SIGMA_D) - c_skip * z) / safe, torch.zeros_like(z))


def imm_config(**train):
    return check_run(Experiment(REPO / "configs").resolve("toy", "gauss1d", "imm", 0, {"train": train} if train else {}))


def test_exact_map_gives_both_particle_sets_the_target_law_and_a_loss_at_its_floor():
    """With the exact F*, y = f_{s,t}(x_t) and ỹ = f_{s,r}(x_r) both follow N(m_s, V_s) (standardised: mean 0,
    std 1 over 8192 particles of mixed times), and the loss is no larger than its sampling floor: the same
    estimator with ỹ replaced by independent exact draws of N(m_s, V_s)."""
    cfg = imm_config()
    spec = FlowMapSpec(**{**cfg.precond.flowmap.model_dump(), "time_scale": 1.0})
    model = FlowMap(ExactTrigFlow(), spec, SIGMA_D)
    loss = losses.build(cfg)
    g = torch.Generator().manual_seed(0)
    x0 = gt.MU + gt.S * torch.randn(8192, 1, generator=g, dtype=torch.float64)
    y, y_tilde, s, t = loss.particles(model, model, x0, Draws.of(g, 8192))
    m_s, s_s = gt.mean(s)[:, None], gt.std(s, nu=SIGMA_D)[:, None]
    for z in ((y - m_s) / s_s, (y_tilde - m_s) / s_s):
        assert abs(z.mean().item()) < 0.04 and abs(z.std().item() - 1) < 0.03, (z.mean(), z.std())
    assert (s <= t).all() and torch.equal(s.reshape(-1, 4), s[::4, None].expand(-1, 4))
    width = kernel_width(s[::4], t[::4], SIGMA_D)
    weight = time_weight(t[::4], 2.0, 4.0)
    independent = m_s + s_s * torch.randn(y.shape, generator=g, dtype=torch.float64)
    floor = (weight * mmd2(y.reshape(-1, 4, 1), independent.reshape(-1, 4, 1), width)).mean()
    exact = (weight * mmd2(y.reshape(-1, 4, 1), y_tilde.reshape(-1, 4, 1), width)).mean()
    assert 0 <= exact <= floor, (exact, floor)


def test_per_sample_values_spread_each_groups_loss_over_its_particles():
    cfg = imm_config()
    loss = losses.build(cfg)
    torch.manual_seed(0)
    from cmbench.nets import build_model
    model = build_model(cfg)
    values = loss(model, model, torch.randn(16, 1), 0, torch.Generator().manual_seed(1))
    assert values.shape == (16,) and torch.equal(values.reshape(4, 4), values[::4, None].expand(-1, 4))
    assert values.requires_grad


class Recorder(torch.nn.Module):
    """A net that notes the CPU RNG state (which dropout draws from) at each call."""

    def __init__(self, net):
        super().__init__()
        self.net, self.states = net, []

    def forward(self, *args):
        self.states.append(torch.get_rng_state())
        return self.net(*args)


@pytest.mark.parametrize("rewind", [True, False])
def test_target_pass_draws_the_online_dropout_masks(rewind, monkeypatch):
    """ỹ's pass starts from the RNG state of y's (pieces.same_dropout); without the rewind it would not (the check
    can fail)."""
    import contextlib
    from cmbench.losses import pieces
    from cmbench.nets.unet import SongUNet
    if not rewind:
        monkeypatch.setattr(pieces, "same_dropout", lambda device: contextlib.nullcontext())
    cfg = imm_config()
    net = Recorder(SongUNet(8, 1, 1, model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                            dropout=0.3, time2="add"))
    model = FlowMap(net, cfg.precond.flowmap, SIGMA_D).train()
    losses.build(cfg).particles(model, model, torch.rand(8, 1, 8, 8) * 2 - 1, Draws.of(torch.Generator(), 8))
    assert len(net.states) == 2 and torch.equal(*net.states) == rewind


def test_particles_must_divide_the_batch():
    with pytest.raises(ConfigError, match="particles 4 must divide train.batch 510"):
        imm_config(batch=510)
    with pytest.raises(ConfigError, match="needs precond 'flowmap'"):
        check_run(Experiment(REPO / "configs").resolve("toy", "gauss1d", "imm", 0, {
            "precond": {"flowmap": {"path": "fm", "output": "velocity"}}}))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2000 steps at batch 512 with a short sampling EMA (0.99: calibration.md), ~10 s on one idle core."""
    from cmbench import checkpoint, paths
    from cmbench.nets import build_model
    from cmbench.train import loop
    cfg = imm_config(steps=2000, ema_decay=0.99)
    rdir = paths.run_dir(tmp_path_factory.mktemp("imm"), cfg.run)
    loop.train(cfg, rdir, progress=False)
    model = build_model(cfg).double()
    model.load_state_dict(checkpoint.load(paths.final_weights(rdir))["ema"])
    return model


def w2_to_normal(x: torch.Tensor, mean, std) -> float:
    """W2 of a 1-D sample to N(mean, std²): sorted sample against the normal quantiles at (i + ½)/n."""
    q = torch.special.ndtri((torch.arange(len(x), dtype=torch.float64) + 0.5) / len(x))
    return (x.sort().values - (mean + std * q)).square().mean().sqrt().item()


PAIRS = [(0.006, 0.994), (0.006, 0.5), (0.3, 0.8), (0.5, 0.9)]


def pushed(model, s, t, n=10_000):
    """x_t ~ N(m_t, V_t) exactly, and f_{s,t}(x_t) of the trained model."""
    z = gt.mean(t) + gt.std(t, nu=SIGMA_D) * torch.randn(n, 1, generator=torch.Generator().manual_seed(3),
                                                        dtype=torch.float64)
    with torch.no_grad():
        return z, model.step(z, torch.full((n,), s, dtype=torch.float64), torch.full((n,), t, dtype=torch.float64))


def test_trained_map_pushes_the_law_at_t_onto_the_law_at_s(trained):
    """The MMD fixes only the law: f_{s,t}#N(m_t, V_t) = N(m_s, V_s) (new-methods.md §4.9). Measured (seed 0;
    (s, t) = (0.006, 0.994), the 1-step map, is the worst): |Δmean| 0.022 / ≤ 0.002, std ratio 0.90 / ≥ 0.975,
    W2 0.054 / ≤ 0.011 (others); bounds ~2× the worst."""
    for s, t in PAIRS:
        _, f = pushed(trained, s, t)
        m_s, s_s = gt.mean(s), gt.std(s, nu=SIGMA_D)
        stats = (f.mean().item() - m_s, f.std().item() / s_s, w2_to_normal(f[:, 0], m_s, s_s))
        assert abs(stats[0]) < 0.045 and abs(stats[1] - 1) < 0.2 and stats[2] < 0.11, (s, t, stats)


def test_trained_map_is_the_monotone_one(trained):
    """Of the maps with that law, the net finds the natural (ODE) one f* = m_s + (S_s/S_t)(z − m_t), not its
    reflection. Measured (seed 0): mean |f − f*| over x_t ~ N(m_t, V_t) 0.041 for (0.006, 0.994), ≤ 0.008 for
    the others; bound ~2.5× the worst."""
    for s, t in PAIRS:
        z, f = pushed(trained, s, t)
        err = (f - gt.flow(z, t, s, nu=SIGMA_D)).abs().mean().item()
        assert err < 0.1, (s, t, err)


def test_one_step_samples_have_the_data_law(trained):
    """The pushforward sampler from x_T = 80·ε to t_min (cmbench.sample.flowmap_sample). Measured (seed 0):
    W2 0.055 at 1 step (the EMA of a 2000-step run; the toy suite's budget: configs/variants/imm.yaml)."""
    from cmbench.sample import flowmap_sample
    x_t = 80 * torch.randn(10_000, 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64).numpy()
    x = torch.from_numpy(flowmap_sample(trained, [80.0], x_t, batch=10_000))
    assert w2_to_normal(x[:, 0], gt.MU, gt.S) < 0.12
    model = FlowMap(ExactTrigFlow(), FlowMapSpec(path="fm_sd", output="trigflow", second="end"), SIGMA_D)
    with pytest.raises(ValueError, match="splits groups of particles 4"):     # one rank's shard of a global batch
        losses.build(imm_config()).particles(model, model, torch.zeros(8, 1), Draws(torch.Generator(), 16, slice(2, 10)))
