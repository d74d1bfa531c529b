"""Curricula, pairing, distances and the CT/iCT losses against hand computations and closed forms."""
import math

import numpy as np
import pytest
from pydantic import BaseModel
import torch

from cmbench import losses
from cmbench.config import Experiment
from cmbench.losses import pieces
from conftest import REPO


def test_karras_grid_endpoints_and_order():
    s = pieces.karras_sigmas(18, 0.002, 80.0, 7.0)
    assert s[0].item() == 0.002 and s[-1].item() == 80.0
    assert torch.all(s[1:] > s[:-1])
    # interior point from Karras et al. Eq. 5 written out for i = 9 of 18
    lo, hi = 0.002 ** (1 / 7), 80 ** (1 / 7)
    assert s[9].item() == pytest.approx((lo + 9 / 17 * (hi - lo)) ** 7, rel=1e-12)


def test_ict_doubling_curriculum_k400k():
    total = 400_000   # K' = floor(400k / (log2(128) + 1)) = 50k
    expected = [11, 21, 41, 81, 161, 321, 641, 1281]
    for stage, n in enumerate(expected):
        assert pieces.ict_discretization(stage * 50_000, total, 10, 1280) == n
        assert pieces.ict_discretization(stage * 50_000 + 49_999, total, 10, 1280) == n
    assert pieces.ict_discretization(total, total, 10, 1280) == 1281     # capped at s1 + 1


def test_ct_curriculum_endpoints():
    total = 800_000
    assert pieces.ct_discretization(0, total, 2, 150) == 2
    assert pieces.ct_discretization(total, total, 2, 150) == 151
    # paper: μ(0) = exp(2 ln 0.9 / 2) = 0.9; released code divides by N − 1 = 1: 0.81
    assert pieces.ct_target_ema(0, total, 2, 150, 0.9, "paper") == pytest.approx(0.9)
    assert pieces.ct_target_ema(0, total, 2, 150, 0.9, "code") == pytest.approx(0.81)
    assert pieces.ct_target_ema(total, total, 2, 150, 0.9, "paper") == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    assert pieces.ct_target_ema(total, total, 2, 150, 0.9, "paper") == pytest.approx(0.998605, abs=1e-6)
    assert pieces.ct_target_ema(total, total, 2, 150, 0.9, "code") == pytest.approx(0.998596, abs=1e-6)


def test_pseudo_huber_limits():
    a, c = torch.zeros(4, 3, dtype=torch.float64), 0.03
    small = torch.full((4, 3), 1e-5, dtype=torch.float64)
    sq = small.square().sum(1)
    assert torch.allclose(pieces.pseudo_huber(small, a, c), sq / (2 * c), rtol=1e-6)
    big = torch.full((4, 3), 100.0, dtype=torch.float64)
    assert torch.allclose(pieces.pseudo_huber(big, a, c), big.norm(dim=1) - c, rtol=1e-6)
    assert pieces.ict_huber_c(3072) == pytest.approx(0.0299, abs=1e-4)   # CIFAR-10 value (papers.md §3.1)


def test_lognormal_pair_probs_match_erf_formula():
    s = pieces.karras_sigmas(11, 0.002, 80.0)
    p = pieces.lognormal_pair_probs(s, -1.1, 2.0)
    cdf = [math.erf((math.log(v) + 1.1) / (math.sqrt(2) * 2.0)) for v in s.tolist()]
    raw = np.diff(cdf)
    assert np.allclose(p.numpy(), raw / raw.sum(), rtol=1e-12)
    assert p.sum().item() == pytest.approx(1.0)


class Recorder(torch.nn.Module):
    """f(x, σ) = w·σ·x: records every call so the test can check what the loss fed it."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5, dtype=torch.float64))
        self.calls = []

    def forward(self, x, sigma, labels=None):
        self.calls.append((x.detach().clone(), sigma.detach().clone(), torch.is_grad_enabled()))
        return self.w * sigma[:, None] * x


def build_loss(variant, **train):
    cfg = Experiment(REPO / "configs").resolve("toy", "ring2d", variant, 0, {"train": {"steps": 1000, **train}})
    return losses.build(cfg)


@pytest.mark.parametrize("variant", ["ct", "ict"])
def test_loss_against_hand_computation(variant):
    loss = build_loss(variant)
    x0 = torch.tensor([[0.3, -1.0], [1.0, 0.2], [-0.5, 0.5]], dtype=torch.float64)
    model, target = Recorder(), Recorder()
    per_sample = loss(model, target, x0, 0, torch.Generator().manual_seed(3))
    (x_hi, s_hi, grad_hi), = model.calls
    (x_lo, s_lo, grad_lo), = target.calls
    assert grad_hi and not grad_lo                          # stop-gradient on the target
    grid = pieces.karras_sigmas(loss.discretization(0), 0.002, 80.0).tolist()
    for a, b in zip(s_lo.tolist(), s_hi.tolist()):          # adjacent points of the current grid
        assert grid.index(b) == grid.index(a) + 1
    z_hi, z_lo = (x_hi - x0) / s_hi[:, None], (x_lo - x0) / s_lo[:, None]
    assert torch.allclose(z_hi, z_lo, atol=1e-9)            # the same noise z for both points (CT, Alg. 3)
    pred, tgt = 0.5 * s_hi[:, None] * x_hi, 0.5 * s_lo[:, None] * x_lo
    if variant == "ct":    # ℓ2 (mean over dims), λ ≡ 1
        hand = ((pred - tgt) ** 2).mean(1)
    else:                  # Pseudo-Huber with c = 0.00054·sqrt(2), λ = 1/(σ_{i+1} − σ_i)
        c = 0.00054 * math.sqrt(2)
        hand = (((pred - tgt) ** 2).sum(1) + c * c).sqrt().sub(c) / (s_hi - s_lo)
    assert torch.allclose(per_sample, hand, rtol=1e-12)


def test_ict_pairs_follow_lognormal_and_ct_pairs_uniform():
    ict, ct = build_loss("ict"), build_loss("ct", steps=1)
    gen = torch.Generator().manual_seed(0)
    model = Recorder()
    x0 = torch.zeros(200_000, 2, dtype=torch.float64)
    ict(model, model, x0, 0, gen)
    grid = pieces.karras_sigmas(11, 0.002, 80.0)
    idx = torch.searchsorted(grid, model.calls[1][1])            # target σ_i → index i
    freq = torch.bincount(idx, minlength=10).double() / len(idx)
    assert torch.allclose(freq, pieces.lognormal_pair_probs(grid, -1.1, 2.0), atol=3e-3)
    assert ct.target_ema(0) == pytest.approx(0.9) and ict.target_ema(0) is None


def test_registry_rejects_bad_losses():
    """The registry checks what the config check relies on: a Loss, a strict Params, Params.name = the name."""
    from typing import Literal

    from cmbench.config import Strict
    from cmbench.losses.base import Loss

    def loss(params):
        return type("X", (Loss,), {"Params": params, "__call__": lambda *a: None})

    class Good(Strict):
        name: Literal["fresh_name"]

    class Loose(BaseModel):
        name: Literal["fresh_name"]

    with pytest.raises(ValueError, match="lower-case identifier"):
        losses.register("Bad Name")(loss(Good))
    with pytest.raises(ValueError, match="already registered"):
        losses.register("ict")(loss(Good))
    with pytest.raises(TypeError, match="not a subclass of cmbench.losses.base.Loss"):
        losses.register("fresh_name")(type("X", (), {"Params": Good}))
    with pytest.raises(TypeError, match="Params must be a cmbench.config.Strict model"):
        losses.register("fresh_name")(loss(None))
    with pytest.raises(TypeError, match="Params must be a cmbench.config.Strict model"):
        losses.register("fresh_name")(loss(Loose))
    with pytest.raises(TypeError, match=r"Params.name must be Literal\['other'\]"):
        losses.register("other")(loss(Good))
    assert "fresh_name" not in losses.LOSSES and "other" not in losses.LOSSES


def test_registry_finds_every_loss_module():
    """No hand-kept list: every module of cmbench/losses that registers a loss is found."""
    import pkgutil

    import cmbench.losses
    modules = {m.name for m in pkgutil.iter_modules(cmbench.losses.__path__)}
    found = {cls.__module__.rsplit(".", 1)[1] for cls in losses.LOSSES.values()}
    assert found == modules - {"base", "pieces", "consistency"}
    assert set(losses.LOSSES) == {"ct", "ict", "cd", "direct_cm", "edm", "ect", "sct", "scd", "imm", "meanflow",
                                  "shortcut", "tcm"}
