"""Shortcut models (new-methods.md §3): the loss against the exact Gaussian shortcut, its batch split by hand,
and a short toy run against the exact map at each step level."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import gaussian_truth as gt
from cmbench import losses, paths
from cmbench.checks import check_run
from cmbench.config import ConfigError, Experiment, FlowMapSpec
from cmbench.losses.shortcut import step_labels
from cmbench.nets import build_model
from cmbench.nets.precond import FlowMap
from cmbench.sample import flowmap_sample
from cmbench.train import loop
from conftest import REPO

M = 128
SPEC = FlowMapSpec(second="log2_gap")


class ExactShortcut(nn.Module):
    """u*(z, r, t) of N(0.3, 0.5²) as a 'velocity' net with Shortcut's inputs (z_t, t, labels, log2(1/(t − r)))."""

    def forward(self, z, c1, labels=None, c2=None):
        t = c1[:, None]
        return gt.average_velocity(z, t - 2.0 ** -c2[:, None], t)


class Recorder(nn.Module):
    """A zero velocity that records each call's two time inputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z, c1, labels=None, c2=None):
        self.calls.append((c1.clone(), c2.clone()))
        return torch.zeros_like(z)


def shortcut_loss(configs=REPO / "configs", **loss):
    cfg = Experiment(configs).resolve("toy", "gauss1d", "shortcut", 0, {"loss": loss} if loss else None)
    return losses.build(cfg), cfg


def test_log2_gap_feeds_the_integer_step_label():
    model = FlowMap(Recorder(), SPEC, 0.5)
    t = torch.tensor([1.0, 0.75, 0.5, 1 / 128])
    model.u(torch.zeros(4, 1), t - torch.tensor([1.0, 0.25, 0.125, 1 / 128]), t)
    assert model.net.calls[0][1].tolist() == [0.0, 2.0, 3.0, 7.0]


def test_batch_split_follows_the_reference_code():
    """`get_targets`: B // bootstrap_every bootstrap rows, levels 6, 5, …, 0 with (B // every) // 7 rows each,
    the remainder at level 0 (step 1); the rest flow matching at level 7 (step 1/128)."""
    assert step_labels(64, M, 8).tolist() == [6, 5, 4, 3, 2, 1, 0, 0] + [7] * 56
    counts = step_labels(512, M, 8).bincount().tolist()          # 64 rows: 9 per level, 1 left over
    assert counts == [10, 9, 9, 9, 9, 9, 9, 448]
    counts = step_labels(512, M, 4).bincount().tolist()          # the paper's quarter: 128 rows, 18 per level
    assert counts == [20, 18, 18, 18, 18, 18, 18, 384]
    assert step_labels(16, 4, 2).tolist() == [1, 1, 1, 1, 0, 0, 0, 0] + [2] * 8


def test_rows_get_their_grid_time_step_label_and_two_half_steps():
    """By hand, for one row per level: τ = j/M floored to the row's step grid, t = 1 − τ, r = t − step; the online
    pass sees label k, the target net label k + 1 at t and at t − step/2; a zero net gives target 0 on bootstrap
    rows and ε − x on flow-matching rows."""
    loss, _ = shortcut_loss()
    k = torch.tensor([0, 1, 3, 6, 7, 7])
    j = torch.tensor([100, 100, 37, 127, 5, 127])
    # τ: 0 (step 1); ½·floor(100/64) = ½; ⅛·floor(37/16) = ¼; (1/64)·floor(127/2) = 63/64; 5/128; 127/128
    t_hand = torch.tensor([1.0, 0.5, 0.75, 1 / 64, 123 / 128, 1 / 128], dtype=torch.float64)
    x0, eps = torch.full((6, 1), 0.2, dtype=torch.float64), torch.full((6, 1), -1.5, dtype=torch.float64)
    target = FlowMap(Recorder(), SPEC, 0.5)
    z, r, t, tgt = loss.regression(target, x0, eps, k, j)
    torch.testing.assert_close(t, t_hand, rtol=0, atol=0)
    torch.testing.assert_close(r, t_hand - 2.0 ** -k.double(), rtol=0, atol=0)
    torch.testing.assert_close(z, (1 - t_hand[:, None]) * 0.2 - t_hand[:, None] * 1.5, rtol=0, atol=1e-15)
    assert tgt[:4].abs().max() == 0 and torch.equal(tgt[4:], torch.full((2, 1), -1.7, dtype=torch.float64))
    (t1, k1), (t2, k2) = target.net.calls
    torch.testing.assert_close(t1, t_hand[:4], rtol=0, atol=0)
    torch.testing.assert_close(t2, t_hand[:4] - 2.0 ** -(k[:4].double() + 1), rtol=0, atol=0)
    assert k1.tolist() == k2.tolist() == [1.0, 2.0, 4.0, 7.0]


def test_exact_shortcut_is_a_fixed_point_of_the_bootstrap_and_flow_matching_has_its_floor():
    """With the exact u* in both nets: every bootstrap row's loss is 0 (s*(2d) = mean of two s*(d) steps, the
    semigroup property, §3.8); a flow-matching row at time t has residual mean 0 and mean square
    s²/V_t + (a − b)²·V_t, where a − b is the slope gap between u*(·, t − 1/M, t) and v(·, t) (§0.3)."""
    loss, _ = shortcut_loss()
    model = FlowMap(ExactShortcut(), SPEC, 0.5)
    gen = torch.Generator().manual_seed(0)
    x0 = gt.MU + gt.S * torch.randn(512, 1, generator=gen, dtype=torch.float64)
    per_sample = loss(model, model, x0, 0, gen)
    assert per_sample[:64].abs().max() < 1e-24 and per_sample[64:].mean() > 0.1

    n = 100_000
    x0 = gt.MU + gt.S * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    eps = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    for j in (0, 40, 96, 127):
        z, r, t, tgt = loss.regression(model, x0, eps, torch.full((n,), 7), torch.full((n,), j))
        res = model.u(z, r, t) - tgt
        t0, var = 1 - j / M, gt.std(1 - j / M) ** 2
        slope_gap = ((gt.std(t0) - gt.std(t0 - 1 / M)) * M - (t0 - (1 - t0) * gt.S**2) / gt.std(t0)) / gt.std(t0)
        floor = gt.S**2 / var + slope_gap**2 * var
        assert abs(res.mean().item()) < 4 * math.sqrt(floor / n), j
        assert res.square().mean().item() == pytest.approx(floor, rel=0.02), j


def test_shortcut_refuses_what_it_cannot_train(configs):
    exp = Experiment(configs)
    with pytest.raises(ConfigError, match="flowmap.output 'velocity'"):
        check_run(exp.resolve("toy", "gauss1d", "shortcut", 0,
                              {"precond": {"flowmap": {"path": "fm_sd", "output": "trigflow"}}}))
    with pytest.raises(ConfigError, match="power of 2"):
        check_run(exp.resolve("toy", "gauss1d", "shortcut", 0, {"loss": {"m": 100}}))
    with pytest.raises(ConfigError, match="fewer bootstrap rows"):
        check_run(exp.resolve("toy", "gauss1d", "shortcut", 0, {"train": {"batch": 48}}))


# The toy config for 3000 steps with a sampling EMA of 0.99 (0.999 lags at this length, calibration.md). Measured,
# seeds 0 / 1: max |u − u*| per level k = 0..7 over t on the level's grid × z within ±2 std of z_t
#   0.078 0.249 0.157 0.102 0.093 0.104 0.110 0.113 / 0.077 0.338 0.138 0.080 0.093 0.099 0.101 0.102
# and W2 of 1- / 2-step samples to N(0.3, 0.5²) (Gaussian fit, 4000 samples) 0.056 / 0.039 and 0.056 / 0.035.
# At 1500 steps the levels were still 0.2–0.7 off. Bounds ~2× the worse seed.
STEPS, LEVEL_ERR, W2 = 3000, 0.6, {"1": 0.12, "2": 0.08}


def test_shortcut_learns_the_exact_shortcut_at_every_level(tmp_path):
    cfg = check_run(Experiment(REPO / "configs").resolve(
        "toy", "gauss1d", "shortcut", 0, {"train": {"steps": STEPS, "ema_decay": 0.99}}))
    rdir = paths.run_dir(tmp_path, cfg.run)
    final = loop.train(cfg, rdir, progress=False)
    model = build_model(cfg)
    model.load_state_dict(torch.load(final, weights_only=True)["ema"])
    model.eval().double()
    z = torch.linspace(-2, 2, 21, dtype=torch.float64)[:, None]
    with torch.no_grad():
        for k in range(8):
            d = 2.0 ** -k
            for t in np.arange(1, d / 2, -d):
                tt = torch.full((21,), t, dtype=torch.float64)
                zz = gt.mean(t) + gt.std(t) * z
                err = (model.u(zz, tt - d, tt) - gt.average_velocity(zz, t - d, t)).abs().max().item()
                assert err < LEVEL_ERR, (k, t, err)
    x_t = 80 * np.random.default_rng(0).standard_normal((4000, 1))
    for nfe, bound in W2.items():
        x = flowmap_sample(model, cfg.sample.sigmas[nfe], x_t, 4000)
        w2 = math.hypot(x.mean() - gt.MU, x.std() - gt.S)     # W2 between Gaussians; samples are near-Gaussian
        assert w2 < bound, (nfe, w2)


def test_adamw_weight_decay_is_opt_in():
    """Shortcut's AdamW with weight decay 0.1 (new-methods.md §3.4); every other config keeps Adam without decay."""
    exp = Experiment(REPO / "configs")
    opt = loop.build_optimizer(exp.resolve("toy", "gauss1d", "shortcut", 0), [nn.Parameter(torch.zeros(1))])
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.1
    opt = loop.build_optimizer(exp.resolve("toy", "gauss1d", "ict", 0), [nn.Parameter(torch.zeros(1))])
    assert type(opt) is torch.optim.Adam and opt.defaults["weight_decay"] == 0


@pytest.mark.parametrize("every", [8, 4])
def test_training_flops_count_the_bootstrap_passes(every):
    """Per sample: the online pass with backward (3 forwards) and two target forwards on 1/every of the batch, × the
    two-time MLP's forward by hand (inputs 1 + 16 + 16 sin/cos features, 3 hidden layers of 128, output 1)."""
    from cmbench.train import flops
    cfg = Experiment(REPO / "configs").resolve("toy", "gauss1d", "shortcut", 0, {"loss": {"bootstrap_every": every}})
    per_forward = 2 * (33 * 128 + 2 * 128 * 128 + 128 * 1)
    got = flops.flops_per_step(cfg, build_model(cfg), None, "cpu")
    assert got == pytest.approx((3 + 2 / every) * per_forward * cfg.train.batch, rel=1e-12)
