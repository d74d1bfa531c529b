"""Continuous-time consistency models sCT and sCD (Lu & Song 2024, "Simplifying, Stabilizing & Scaling
Continuous-Time Consistency Models", arXiv 2410.11081; papers.md §5).

Both train the TrigFlow model f(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t) with the tangent of f along the
PF ODE as target (Eq. 8, Alg. 1); they differ only in dx_t/dt: sCT uses the unbiased single-sample velocity
of the same (x0, z), sCD the teacher's PF-ODE velocity."""
from abc import abstractmethod
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from cmbench.config import RunConfig, Strict
from cmbench.draws import Draws
from cmbench.losses import pieces, register
from cmbench.losses.base import Loss
from cmbench.nets.mlp import NoiseEmbedding


def trig(t: torch.Tensor, ndim: int):
    """cos t and sin t of per-sample times [B], shaped to broadcast against [B, ...] data of ndim dims."""
    shape = (-1, *[1] * (ndim - 1))
    return t.cos().reshape(shape), t.sin().reshape(shape)


class SCMParams(Strict):
    p_mean: float = -1.0                          # τ ~ N(P_mean, P_std²), σ = e^τ (CIFAR-10: papers.md §5.4)
    p_std: float = Field(default=1.4, gt=0)
    warmup: int = Field(default=10_000, ge=0)     # H of the tangent warm-up r = min(1, k/H); 0: none (Alg. 1)
    tangent_c: float = Field(default=0.1, gt=0)   # g ← g/(‖g‖ + c) (Alg. 1; papers.md §5.3)
    adaptive_weighting: bool = True               # learned w_φ(t) (Alg. 1; papers.md §5.3); false: w ≡ 0


class AdaptiveWeight(nn.Module):
    """w_φ(t): sin/cos features of t and one linear layer (EDM2-style uncertainty weighting; papers.md §5.3).
    Zero-initialised so that training starts from the unweighted loss."""

    def __init__(self, features: int, max_freq: float):
        super().__init__()
        self.embed = NoiseEmbedding(features, max_freq)
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear(self.embed(t)).squeeze(1)


def teacher_velocity(denoise, x_t: torch.Tensor, t: torch.Tensor, sigma_data: float,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """dx_t/dt of the PF ODE from an EDM σ-space denoiser D (sCM App. B.2 change of variables).

    x_t = cos t·x_σ with σ = σ_d tan t, and dx_σ/dσ = (x_σ − D)/σ, dσ/dt = σ_d/cos²t, so
    dx_t/dt = −sin t·x_σ + cos t·(x_σ − D)/σ·σ_d/cos²t = −sin t·x_σ + (x_σ − D)/sin t."""
    cos, sin = trig(t, x_t.ndim)
    x_sigma = x_t / cos
    return -sin * x_sigma + (x_sigma - denoise(x_sigma, sigma_data * t.tan(), labels)) / sin


def tangent_jvp(target, x_t: torch.Tensor, t: torch.Tensor, dxt_dt: torch.Tensor, labels: torch.Tensor | None = None):
    """(F⁻, cos t·sin t·σ_d·dF⁻/dt) from one forward-mode JVP of F_θ⁻ along the PF ODE (Alg. 1).

    Alg. 1 differentiates (u, t) ↦ F(u, t) at u = x_t/σ_d with tangent (cos t sin t·dx_t/dt, cos t sin t·σ_d);
    `raw` takes x_t itself, so its x-tangent carries the extra σ_d. Scaling the tangent by cos t sin t
    instead of the result keeps it bounded near t = 0 and π/2 (no FP16 overflow)."""
    cos, sin = trig(t, x_t.ndim)
    cs = cos * sin * target.sigma_data
    # in fp32 under any train.precision: torch 2.14's forward-mode AD through autocast fails on the U-Net's
    # convolutions on CPU (input fp32, weight bf16), and the JVP is the loss's overflow-prone part
    with torch.autocast(x_t.device.type, enabled=False):
        return torch.func.jvp(lambda x, s: target.raw(x, s, labels), (x_t, t), (cs * dxt_dt, cs.reshape(-1)))


class SCMLoss(Loss):
    """Shared by sCT and sCD; a subclass supplies dx_t/dt."""

    def __init__(self, params: SCMParams, cfg: RunConfig, teacher=None, model=None):
        super().__init__(params, cfg, teacher, model)
        self.sigma_data = cfg.precond.sigma_data
        if params.adaptive_weighting:
            if model is None:
                raise ValueError("sCM's adaptive weight is sized by the network: build the loss with its model")
            self.module = AdaptiveWeight(*model.net.noise_features)   # the time features the network suits

    @classmethod
    def check(cls, params, cfg):
        if cfg.precond.name != "trigflow":
            raise ValueError(f"trains the TrigFlow model: needs precond 'trigflow', not {cfg.precond.name!r}")
        if cfg.teacher is not None and cfg.teacher.init_student and cfg.precond.trigflow_net != "edm":
            # an EDM teacher's F predicts another quantity from other inputs (c_in, c_noise): only the wrapped
            # form (precond.trigflow_net 'edm') starts from its weights
            raise ValueError("starts from an EDM-preconditioned teacher (init_student) only with "
                             "precond.trigflow_net 'edm'")

    @abstractmethod
    def velocity(self, x0: torch.Tensor, z: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 labels: torch.Tensor | None) -> torch.Tensor:
        """dx_t/dt at (x_t, t)."""

    def tangent_warmup(self, step: int) -> float:
        """r = min(1, k/H) (Alg. 1): the x_t + σ_d·dF/dt half of the tangent is faded in."""
        return min(1.0, step / self.params.warmup) if self.params.warmup else 1.0

    def stats(self, step):
        return {"tangent_warmup": self.tangent_warmup(step)}

    def __call__(self, model, target, x0, step, generator, labels=None):
        # t = arctan(e^τ/σ_d), τ ~ N(P_mean, P_std²): EDM's lognormal σ in TrigFlow time (papers.md §5.3)
        draws = Draws.of(generator, x0.shape[0])
        tau = self.params.p_mean + self.params.p_std * draws.randn((), like=x0)
        t = torch.atan(tau.exp() / self.sigma_data)
        z = self.sigma_data * draws.randn(x0.shape[1:], like=x0)
        return self.loss_at(model, target, x0, z, t, step, labels)

    def loss_at(self, model, target, x0, z, t, step, labels=None):
        """The per-sample loss at given t [B] and z ~ N(0, σ_d² I)."""
        cos, sin = trig(t, x0.ndim)
        x_t = cos * x0 + sin * z
        r = self.tangent_warmup(step)
        # θ⁻ = stopgrad θ: F⁻ is the online pass's own output (public sCM code takes F_θ.detach()), so
        # F_θ − F⁻ = 0 exactly whatever the dropout, and the JVP runs under the same dropout masks
        with pieces.same_dropout(x0.device):
            online = model.raw(x_t, t, labels)
        with torch.no_grad():
            dxt_dt = self.velocity(x0, z, x_t, t, labels)
            f_jvp, jvp = tangent_jvp(target, x_t, t, dxt_dt, labels)
            f_minus = online.detach() if target is model else f_jvp
            # Alg. 1: g = cos t·df⁻/dt with the warm-up r on the second term, where sCM Eq. 8's
            # df⁻/dt = −cos t·(σ_d F⁻ − dx_t/dt) − sin t·(x_t + σ_d dF⁻/dt)
            g = -cos**2 * (self.sigma_data * f_minus - dxt_dt) - r * (cos * sin * x_t + jvp)
            # tangent normalisation g/(‖g‖ + c) (Alg. 1), the norm over all data dimensions of a sample
            g = g / (g.flatten(1).norm(dim=1).reshape(cos.shape) + self.params.tangent_c)
        # Alg. 1 loss: (e^w/D)·‖F_θ − F⁻ − g‖² − w; its θ-gradient at θ = θ⁻ is −(2e^w/D)·g·∂F_θ/∂θ (Eq. 8)
        w = self.module(t) if self.module is not None else torch.zeros_like(t)
        sq = (online - f_minus - g).flatten(1).square().sum(dim=1)
        return w.exp() / x0[0].numel() * sq - w


class SCTParams(SCMParams):
    name: Literal["sct"]


@register("sct")
class SCT(SCMLoss):
    """sCT: the target tangent from the same (x0, z) as x_t — an unbiased estimate of the PF-ODE velocity.
    A teacher, if configured, can only initialise the student."""
    Params = SCTParams

    def velocity(self, x0, z, x_t, t, labels):
        cos, sin = trig(t, x0.ndim)
        return cos * z - sin * x0


class SCDParams(SCMParams):
    name: Literal["scd"]


@register("scd")
class SCD(SCMLoss):
    """sCD: the teacher's PF-ODE velocity at x_t (papers.md §5.3), from its EDM σ-space denoiser."""
    Params = SCDParams
    needs_teacher = True

    def velocity(self, x0, z, x_t, t, labels):
        return teacher_velocity(self.teacher.denoise, x_t, t, self.sigma_data, labels)
