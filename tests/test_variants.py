"""The distillation and tuning losses (EDM, CD, Direct CM, ECT) against hand computations and closed forms."""
import math

import numpy as np
import pytest
import torch

from cmbench import solvers
from cmbench.config import ConfigError, Experiment
from cmbench.data.toy import Gaussian
from cmbench.losses import pieces
from cmbench.teacher import AnalyticTeacher
from cmbench.checks import check_run
from conftest import REPO
from test_losses import Recorder


def resolve(variant, dataset="gauss1d", overrides=None):
    return check_run(Experiment(REPO / "configs").resolve("toy", dataset, variant, 0, overrides))


def build(variant, teacher=None, **over):
    from cmbench import losses
    cfg = resolve(variant, overrides=over or None)
    return losses.build(cfg, teacher if teacher is not None else AnalyticTeacher(cfg)), cfg


class ExactTeacher:
    """The closed-form denoiser of N(0.3, 0.5²) in torch float64."""
    mu, s = 0.3, 0.5

    def denoise(self, x, sigma, labels=None):
        return self.mu + self.s**2 / (self.s**2 + sigma[:, None] ** 2) * (x - self.mu)


def exact_flow(x, s_from, s_to, mu=0.3, s=0.5):
    return mu + (x - mu) * torch.sqrt((s**2 + s_to**2) / (s**2 + s_from**2))


def test_cd_target_is_f_star_up_to_third_order_heun_error():
    """With the exact teacher, CD's target f*(x̂_n, σ_n) equals f*(x_{n+1}, σ_{n+1}) (f* is invariant along the exact
    flow, papers.md §8.1) up to the Heun step's local error, which falls as Δσ³: a measured log-log slope."""
    g = Gaussian(np.array([0.3]), 0.5)
    x = torch.linspace(-2, 2, 5, dtype=torch.float64)[:, None]
    hi = torch.full((5,), 1.0, dtype=torch.float64)
    steps, gaps = [0.2, 0.1, 0.05, 0.025], []
    for h in steps:
        x_lo = solvers.heun_step(ExactTeacher().denoise, x, hi, hi - h)
        f_hi = g.consistency_map(x.numpy(), hi.numpy(), 0.002)
        f_lo = g.consistency_map(x_lo.numpy(), (hi - h).numpy(), 0.002)
        gaps.append(np.abs(f_lo - f_hi).max())
    slope = np.polyfit(np.log(steps), np.log(gaps), 1)[0]
    assert 2.8 < slope < 3.2, (slope, gaps)
    assert gaps[0] < 1e-3


def test_cd_and_direct_cm_hand_computation():
    x0 = torch.tensor([[0.3], [-0.4], [0.9]], dtype=torch.float64)
    for variant in ("cd", "direct_cm"):
        loss, cfg = build(variant, teacher=ExactTeacher())
        model, target = Recorder(), Recorder()
        per_sample = loss(model, target, x0, 0, torch.Generator().manual_seed(1))
        (x_hi, s_hi, _), = model.calls
        grid = pieces.karras_sigmas(18, 0.002, 80.0)
        i = torch.searchsorted(grid, s_hi) - 1
        if variant == "cd":       # one Heun step of the teacher, then the target network at σ_i
            (x_lo, s_lo, grad), = target.calls
            assert not grad and torch.equal(s_lo, grid[i])
            assert torch.allclose(x_lo, solvers.heun_step(ExactTeacher().denoise, x_hi, s_hi, grid[i]))
            tgt = 0.5 * s_lo[:, None] * x_lo
        else:                     # the teacher ODE to σ_min; no target network call
            assert target.calls == []
            tgt = x_hi.clone()
            for b in range(3):
                for j in range(int(i[b]) + 1, 0, -1):
                    tgt[b:b + 1] = solvers.heun_step(ExactTeacher().denoise, tgt[b:b + 1], grid[j:j + 1], grid[j - 1:j])
            # the exact teacher solved to σ_min is f* itself, up to 17 Heun steps' error
            assert torch.allclose(tgt, exact_flow(x_hi, s_hi[:, None], 0.002), atol=2e-3)
        hand = ((0.5 * s_hi[:, None] * x_hi - tgt) ** 2).mean(1)
        assert torch.allclose(per_sample, hand, rtol=1e-10), variant


def test_edm_loss_hand_computation():
    loss, cfg = build("edm")
    x0 = torch.tensor([[0.1], [0.7]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    model = Recorder()
    per_sample = loss(model, model, x0, 0, gen)
    (x, sigma, grad), = model.calls
    replay = torch.Generator().manual_seed(5)
    n = torch.randn(2, generator=replay, dtype=torch.float64)
    assert torch.allclose(sigma, torch.exp(-1.2 + 1.2 * n))              # ln σ ~ N(−1.2, 1.2²)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(per_sample, weight * ((0.5 * sigma[:, None] * x - x0) ** 2).mean(1))


def test_ect_mapping_and_loss():
    loss, cfg = build("ect")
    t = torch.tensor([0.5, math.log(7) - 1e-6, math.log(7) + 1e-3, 10.0, 80.0], dtype=torch.float64)
    r0 = loss.r_of_t(t, 0)
    assert torch.all(r0[:2] == 0) and torch.all(r0[2:] > 0)             # stage 0, q = 2: r = 0 iff t ≤ ln 7
    hand = t * (1 - 0.5 * (1 + 8 * torch.sigmoid(-t)))
    assert torch.allclose(r0[2:], hand[2:])
    r3 = loss.r_of_t(t, 3 * 500)                                          # stage 3: gap t/16·(1 + 8σ(−t))
    assert torch.allclose(r3, (t * (1 - (1 + 8 * torch.sigmoid(-t)) / 16)).clamp(min=0))
    assert torch.all(t - r3 < t - r0 + 1e-12)                             # the gap shrinks with the stage
    # stage 0 mixes both cases in one batch (r = 0: the target is x0 itself; r > 0: the network at r), stage 10
    # has r > 0 throughout: both are checked, neither is skipped
    x0 = torch.linspace(-1, 1, 64, dtype=torch.float64)[:, None]
    c = cfg.loss["huber_c"]                                                  # sqrt(Δ + c²) − c, weight 1/(t − r)
    for step, mixed in ((0, True), (5000, False)):
        model = Recorder()
        per_sample = loss(model, model, x0, step, torch.Generator().manual_seed(2))
        (x_t, t_s, _), (x_r, r_net, grad) = model.calls                   # online pass, then the target pass
        r = loss.r_of_t(t_s, step)
        assert bool((r == 0).any()) == mixed and bool((r > 0).any())
        # the target pass runs on the whole batch (same dropout masks), at t where r = 0, its output discarded there
        assert not grad and torch.equal(r_net, torch.where(r > 0, r, t_s))
        assert torch.allclose((x_r - x0) / r_net[:, None], (x_t - x0) / t_s[:, None])    # the same z
        tgt = torch.where((r > 0)[:, None], 0.5 * r_net[:, None] * x_r, x0)
        hand = ((((0.5 * t_s[:, None] * x_t - tgt) ** 2).sum(1) + c * c).sqrt() - c) / (t_s - r)
        assert torch.allclose(per_sample, hand, rtol=1e-10), step


def test_analytic_teacher_is_the_exact_denoiser():
    cfg = resolve("cd", "ring2d")
    teacher = AnalyticTeacher(cfg)
    x, sigma = torch.randn(6, 2, dtype=torch.float64), torch.tensor([0.01, 0.1, 1, 5, 20, 80.0], dtype=torch.float64)
    assert np.allclose(teacher.denoise(x, sigma).numpy(), teacher.dist.denoiser(x.numpy(), sigma.numpy()))


@pytest.mark.parametrize("variant,overrides,match", [
    ("cd", {"teacher": None}, "distils a teacher"),
    ("edm", {"precond": {"name": "cm"}}, "needs precond 'edm'"),
    ("cd", {"precond": {"name": "edm"}}, "needs precond 'cm'"),
    ("ect", {"teacher": {"variant": None}}, "needs teacher.variant"),
    ("cd", {"teacher": {"source": "analytic", "init_student": True}}, "takes no teacher.variant, init_student or hash"),
    ("direct_cm", {"loss": {"mu": 0.5}}, "mu"),
    ("scd", {"teacher": {"source": "run", "variant": "edm", "init_student": True}}, "trigflow_net 'edm'"),
])
def test_impossible_variant_configs(variant, overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        resolve(variant, overrides=overrides)
    assert "\n" not in str(e.value)


def test_ect_target_runs_on_the_whole_batch_and_is_x0_where_r_is_0():
    """ECT's code computes the target network on the full batch (so dropout masks line up) and keeps x0 where
    r = 0; the network is never evaluated at r = 0 (c_noise = ¼ ln 0)."""
    loss, cfg = build("ect")
    x0 = torch.linspace(-1, 1, 64, dtype=torch.float64)[:, None]
    model = Recorder()
    per_sample = loss(model, model, x0, 0, torch.Generator().manual_seed(4))    # stage 0: r = 0 for t ≤ ln 7
    (x_t, t, _), (x_r, r_net, grad) = model.calls
    r = loss.r_of_t(t, 0)
    assert not grad and len(r_net) == 64 and (r == 0).any() and (r > 0).any()
    assert torch.equal(r_net, torch.where(r > 0, r, t)) and (r_net > 0).all()
    tgt = torch.where((r > 0)[:, None], 0.5 * r_net[:, None] * x_r, x0)
    c = cfg.loss["huber_c"]
    hand = ((((0.5 * t[:, None] * x_t - tgt) ** 2).sum(1) + c * c).sqrt() - c) / (t - r)
    assert torch.allclose(per_sample, hand, rtol=1e-10)


def test_sqrt_distance_has_zero_gradient_where_the_residual_is_zero():
    """ECT's c = 0 (sqrt Δ): where online and target agree exactly the gradient is 0 instead of NaN (0/0), and the
    other samples' gradients are sqrt's own."""
    a = torch.tensor([[1.0, 2.0], [0.5, -0.5], [3.0, 0.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    d = pieces.pseudo_huber(a, b, 0.0)
    assert torch.allclose(d, (a - b).norm(dim=1))
    d.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.equal(a.grad[0], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(a.grad[1:], ((a - b) / (a - b).norm(dim=1, keepdim=True))[1:].detach())
