"""Shortcut models (Frans, Hafner, Levine, Abbeel, "One Step Diffusion via Shortcut Models", ICLR 2025,
arXiv 2410.12557; official code kvfrans/shortcut-models @6010043, `targets_shortcut.py`; new-methods.md §3).

The paper runs time the other way (τ = 0 noise, τ = 1 data) and its network s(x_τ, τ, d) predicts the jump
(x_{τ+d} − x_τ)/d. In the harness's time t = 1 − τ on the path z_t = (1 − t)·x + t·ε that jump ends at r = t − d, so
the exact shortcut is s*(z, τ, d) = −u(z, t − d, t) (§3.2): the FlowMap model's average velocity with r = t − d,
and its step z − d·u is the paper's Euler step x + d·s. The net's second input is the reference's step label
k = log2(1/d) (precond.flowmap.second 'log2_gap', `model.py` embeds the integer k) or d itself ('gap': the toy
MLP, configs/variants/shortcut.yaml). Per batch (§3.3, `get_targets`):

- flow-matching rows: τ uniform on {0, 1/M, …, 1 − 1/M}, d = 1/M (label log2 M: the smallest step stands in for
  d = 0), target the conditional velocity, here ε − x (the paper's x₁ − x₀ with x₁ data, x₀ noise, sign turned);
- bootstrap rows (the first B/`bootstrap_every` of the batch): trained step 2d ∈ {1/(M/2), …, ½, 1}, τ uniform on
  the 2d-grid {0, 2d, …, 1 − 2d}; target = mean of two d-steps of the EMA target net θ⁻:
  u₁ = u⁻(z_t, t − d, t), z′ = clip(z_t − d·u₁), u₂ = u⁻(z′, t − 2d, t − d), target clip((u₁ + u₂)/2);
- loss: plain squared error, mean over dimensions (the loop averages over the batch).
Dropped from the reference: the (1 − 10⁻⁵) factor on the noise in x_τ (the harness's path is exact), and class
conditioning (label dropout, CFG baked into the bootstrap targets: ImageNet only)."""
import math
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field

from cmbench.config import Strict
from cmbench.draws import Draws
from cmbench.losses import pieces, register
from cmbench.losses.base import Loss


class ShortcutParams(Strict):
    name: Literal["shortcut"]
    m: int = Field(default=128, ge=2)                 # M = `denoise_timesteps`: smallest step 1/M (§3.3, §3.4)
    # bootstrap rows = batch // bootstrap_every: 8 is the code's default (`bootstrap_every`), 4 the paper's
    # "a quarter of each batch" (SC-note §3.1, secondary); unresolved (new-methods.md §3.3, §6 item 3)
    bootstrap_every: int = Field(default=8, ge=1)
    target_ema: float = Field(default=0.999, ge=0, lt=1)   # θ⁻ ← 0.999·θ⁻ + 0.001·θ (`target_update_rate`)
    # the ±4 clip of z′ and of the bootstrap target (`jnp.clip(·, −4, 4)`); null: none. Inactive on the toys
    # (|u*| < 4); in pixel space it cuts velocities ≈ x̂ − ε of the noise tail (|ε| > 3): §3.8
    clip: float | None = Field(default=4.0, gt=0)


def step_labels(batch: int, m: int, bootstrap_every: int) -> torch.Tensor:
    """The trained step label k (step 2^−k) of each row of the global batch, as `get_targets` splits it: the
    bootstrap rows take the levels log2(M) − 1, …, 1, 0 in that order, batch // bootstrap_every // log2(M) rows
    each, the remainder at level 0 (step 1); every other row is flow matching at level log2(M)."""
    levels = int(math.log2(m))
    n_boot = batch // bootstrap_every
    per = n_boot // levels
    boot = torch.arange(levels - 1, -1, -1).repeat_interleave(per)
    return torch.cat([boot, torch.zeros(n_boot - len(boot), dtype=torch.long),
                      torch.full((batch - n_boot,), levels, dtype=torch.long)])


@register("shortcut")
class Shortcut(Loss):
    """Flow matching at the smallest step and self-consistency (two d-steps of θ⁻ = one 2d-step) above it."""
    Params = ShortcutParams

    @classmethod
    def check(cls, params, cfg):
        pieces.require_flowmap(cfg, "fm", "velocity", "an average-velocity flow map of the unit-noise linear path")
        if params.m & (params.m - 1):
            raise ValueError(f"m {params.m} must be a power of 2 (dyadic step sizes d = 2^−k)")
        levels = int(math.log2(params.m))
        if cfg.train.batch // params.bootstrap_every < levels:
            raise ValueError(f"train.batch {cfg.train.batch} // bootstrap_every {params.bootstrap_every} gives "
                             f"fewer bootstrap rows than the {levels} step levels of m {params.m}: raise the batch")
        if cfg.dataset.conditional:
            raise ValueError("class-conditional training (label dropout, CFG in the targets) is not implemented")

    def target_ema(self, step):
        return self.params.target_ema

    def regression(self, target, x0: torch.Tensor, eps: torch.Tensor, k: torch.Tensor, j: torch.Tensor,
                   labels: torch.Tensor | None = None):
        """(z_t, r, t, u_target) of rows with trained step label k [B] and grid index j ∈ {0, …, M − 1} [B]:
        τ = j/M floored to the row's step grid (uniform on it, as the step divides 1 and 1/M divides the step)."""
        p, col = self.params, (-1,) + (1,) * (x0.ndim - 1)
        step = 2.0 ** -k.to(x0.dtype)
        t = 1 - step * torch.floor(j.to(x0.dtype) / (p.m * step))
        r = t - step
        z = (1 - t).reshape(col) * x0 + t.reshape(col) * eps
        tgt = eps - x0
        boot = k < math.log2(p.m)
        if bool(boot.any()):
            with torch.no_grad(), evaluating(target):      # the reference's bootstrap calls run with train=False
                zb, tb, y = z[boot], t[boot], None if labels is None else labels[boot]
                half = step[boot] / 2
                u1 = target.u(zb, tb - half, tb, y)
                z_mid = self.clipped(zb - half.reshape(col) * u1)
                u2 = target.u(z_mid, tb - 2 * half, tb - half, y)
                tgt = tgt.index_put((boot,), self.clipped((u1 + u2) / 2))
        return z, r, t, tgt

    def clipped(self, x: torch.Tensor) -> torch.Tensor:
        c = self.params.clip
        return x if c is None else x.clamp(-c, c)

    def __call__(self, model, target, x0, step, generator, labels=None):
        p = self.params
        draws = Draws.of(generator, x0.shape[0])
        k = step_labels(draws.batch, p.m, p.bootstrap_every)[draws.part].to(x0.device)
        j = draws.multinomial(torch.full((p.m,), 1.0 / p.m))
        eps = draws.randn(x0.shape[1:], like=x0)
        z, r, t, tgt = self.regression(target, x0, eps, k, j.to(x0.device), labels)
        return pieces.l2(model.u(z, r, t, labels), tgt)


@contextmanager
def evaluating(module: torch.nn.Module):
    """The module in eval mode (no dropout), its former mode restored on exit."""
    was = module.training
    module.train(False)
    try:
        yield
    finally:
        module.train(was)
