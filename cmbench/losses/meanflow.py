"""MeanFlow (Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step Generative Modeling", NeurIPS 2025, arXiv
2505.13447; new-methods.md §1, which reads Eqs. 3–11 and Alg. 1 through [MF-note] (secondary) and checks them
against the official PyTorch port [MF-torch] `meanflow/models/meanflow.py` and the JAX code [MF-jax]).

A 'velocity' FlowMap network u_θ(z_t, r, t) learns the average velocity of the linear path z_t = (1 − t)·x + t·ε
(t = 0 data, t = 1 noise) over [r, t]; one step is x = ε − u_θ(ε, 0, 1). No teacher, no target network."""
from typing import Literal

import torch
from pydantic import Field

from cmbench.config import Strict
from cmbench.draws import Draws
from cmbench.losses import pieces, register
from cmbench.losses.base import Loss


class MeanFlowParams(Strict):
    name: Literal["meanflow"]
    # (r, t) sampler (new-methods.md §1.4, [MF-torch] time_sampler.py): t and r each logit-normal; v0 (the paper's
    # CIFAR-10 config, the defaults here: both LN(−2, 2)) sorts them and then sets r = t with probability
    # 1 − ratio; v1 (the port's improved config: t LN(−0.6, 1.6), r LN(−4, 1.6)) sets r = t with probability
    # 1 − ratio first and then r = min(t, r), so fewer than `ratio` of the pairs have r < t (0.70 at 0.75)
    time_sampler: Literal["v0", "v1"] = "v0"
    p_mean_t: float = -2.0
    p_std_t: float = Field(default=2.0, gt=0)
    p_mean_r: float = -2.0
    p_std_r: float = Field(default=2.0, gt=0)
    ratio: float = Field(default=0.75, ge=0, le=1)    # the probability of drawing r ≠ t ([MF-torch] --ratio)
    # adaptive weight w = 1/stopgrad((ℓ + c)^p) (paper Table 1e per [MF-note]; [MF-torch] norm_p, norm_eps; CIFAR-10
    # scripts 0.75 and 1e-3, new-methods.md §1.5). p = 0 is plain squared ℓ2; p = 1 the gradient of log(ℓ + c)
    p: float = Field(default=0.75, ge=0)
    c: float = Field(default=1e-3, gt=0)


def sample_times(params: MeanFlowParams, draws: Draws, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, r) per sample [B], r ≤ t, by the sampler `params.time_sampler` (new-methods.md §1.4)."""
    p = params
    t = torch.sigmoid(p.p_mean_t + p.p_std_t * draws.randn((), like=like))
    r = torch.sigmoid(p.p_mean_r + p.p_std_r * draws.randn((), like=like))
    same = torch.special.ndtr(draws.randn((), like=like)) < 1 - p.ratio   # Φ(n) is uniform: P = 1 − ratio
    if p.time_sampler == "v0":
        return torch.maximum(t, r), torch.where(same, torch.maximum(t, r), torch.minimum(t, r))
    return t, torch.minimum(t, torch.where(same, t, r))


def average_velocity_and_derivative(model, z_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_θ(z_t, r, t), du_θ/dt) with du/dt = v·∂_z u + ∂_t u, the total derivative along dz/dt = v at fixed r
    (MeanFlow Eq. 8 per [MF-note]): one forward-mode JVP with tangent (v, 0, 1) on (z, r, t), as [MF-torch]
    `forward_with_loss` (there ordered (z, t, r), (v, 1, 0)). The primal u keeps its graph to θ: the gradient pass
    is this very forward, so dropout draws one set of masks for u and du/dt (no second pass to align)."""
    return torch.func.jvp(lambda z, r_, t_: model.u(z, r_, t_, labels), (z_t, r, t),
                          (v, torch.zeros_like(r), torch.ones_like(t)))


@register("meanflow")
class MeanFlow(Loss):
    """MeanFlow objective (§4.1 Eqs. 9–11 and Alg. 1 per [MF-note]; new-methods.md §1.2):
    z_t = (1 − t)x + tε, v_c = ε − x, u_tgt = stopgrad(v_c − (t − r)·du_θ/dt) (the MeanFlow identity of Eqs. 3–6
    with the conditional velocity in place of v), ℓ = Σ_dims (u_θ − u_tgt)² (a sum, not a mean, over the D data
    dimensions, as both official codes), loss = ℓ/stopgrad((ℓ + c)^p) (Table 1e). At r = t it is flow matching.
    The stopped target needs no second-order backward (App. B.4 per [MF-note])."""
    Params = MeanFlowParams

    @classmethod
    def check(cls, params, cfg):
        pieces.require_flowmap(cfg, "fm", "velocity", "an average velocity on the unit-noise linear path")

    def residual(self, model, x0: torch.Tensor, eps: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """u_θ − u_tgt at given ε and per-sample (r, t) [B]; the gradient flows through u_θ only."""
        col = (-1,) + (1,) * (x0.ndim - 1)
        z_t = (1 - t.reshape(col)) * x0 + t.reshape(col) * eps
        v = eps - x0
        u, dudt = average_velocity_and_derivative(model, z_t, r, t, v, labels)
        return u - (v - (t - r).reshape(col) * dudt).detach()

    def weighted(self, delta: torch.Tensor) -> torch.Tensor:
        """ℓ/stopgrad((ℓ + c)^p) per sample, ℓ = Σ_dims Δ²."""
        sq = delta.flatten(1).square().sum(dim=1)
        return sq / (sq.detach() + self.params.c) ** self.params.p

    def __call__(self, model, target, x0, step, generator, labels=None):
        draws = Draws.of(generator, x0.shape[0])
        t, r = sample_times(self.params, draws, x0)
        eps = draws.randn(x0.shape[1:], like=x0)
        return self.weighted(self.residual(model, x0, eps, r, t, labels))
