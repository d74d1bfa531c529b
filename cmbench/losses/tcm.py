"""Truncated Consistency Models, stage 2 (Lee et al., ICLR 2025, arXiv 2410.14895; code NVlabs/TCM @b132239:
training/loss.py ECMLoss, training/networks_tcm.py TCMPrecond, training/ct_training_loop.py; new-methods.md §2).

Stage 1 is an ordinary ECT run over the whole σ range (the run's `teacher`). Stage 2 is ECT's loss on the
truncated range σ ≥ t′ with the piecewise consistency function
    f(z, σ) = f_θ(z, σ) for σ ≥ t′,  f_θ₁(z, σ) (the frozen stage-1 model) for σ < t′,
so a pair whose r = σ − Δ(σ) falls below t′ takes its target from stage 1; ⌊ρ·B⌋ boundary samples at σ = t′
make sure some do. The total is L = mean_non-boundary(w·d) + w_b·mean_boundary(w·d) (ct_training_loop.py:
`loss.mean() + loss_boundary.mean()·w_boundary`); without the boundary term the truncated objective has a
trivial solution [TCM-abs]. Defaults: the CIFAR-10 stage-2 command of the TCM README (new-methods.md §2.3)."""
import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field
from scipy import special, stats

from cmbench.draws import Draws
from cmbench.losses import pieces, register
from cmbench.losses.ect import ECT, ECTParams


def truncated_t_log_sigma(n: torch.Tensor, lo: float, hi: float, loc: float, scale: float, df: float) -> torch.Tensor:
    """ln σ from a Student-t(df, loc, scale) truncated to [lo, hi] by inverse CDF (TCM torch_utils/misc.py
    truncated_t), from standard normal draws n (u = Φ(n) is uniform), in float64."""
    law = stats.t(df, loc, scale)
    a, b = law.cdf([lo, hi])
    u = special.ndtr(n.detach().double().cpu().numpy())
    return torch.from_numpy(np.clip(law.ppf(a + u * (b - a)), lo, hi)).to(n.device)


class TCMParams(ECTParams):
    name: Literal["tcm"]
    # stage 2 draws σ from the truncated Student-t below, not ECT's lognormal
    p_mean: None = None
    p_std: None = None
    t_prime: float = Field(default=1.0, gt=0)           # truncation point t′ (README: --tcm_transition_t 1.0)
    rho: float = Field(default=0.25, gt=0, lt=1)        # boundary share ρ (README: --tcm_boundary_ratio 0.25)
    w_boundary: float = Field(default=0.1, ge=0)        # boundary weight w_b (README: --tcm_w_boundary 0.1)
    t_loc: float = 0.0                                  # ln σ ~ Student-t(df, loc, scale) on [ln t′, ln σ_max]
    t_scale: float = Field(default=0.2, gt=0)           # (README stage 2: --t_dist t, loc 0, scale 0.2, df 0.01)
    t_df: float = Field(default=0.01, gt=0)
    ratio_limit: float = Field(default=0.999, gt=0, lt=1)   # 1 − q^−(a+1) ≤ ratio_limit (ct_train.py default)
    # the Δ curriculum continues from stage 1 (README: --resume_tick): stage = (resume_step + step) // double_every;
    # None takes the stage-1 run's train.steps (the teacher run's config)
    resume_step: int | None = Field(default=None, ge=0)


@register("tcm")
class TCM(ECT):
    """ECT's pair loss on σ ≥ t′ with stage-1 targets below t′ and the weighted boundary term."""
    Params = TCMParams
    needs_teacher = True
    teacher_kind = "consistency"

    def __init__(self, params, cfg, teacher=None, model=None):
        super().__init__(params, cfg, teacher, model)
        self.resume_step = params.resume_step
        if teacher is not None:
            if self.resume_step is None:
                self.resume_step = teacher.cfg.train.steps
            if hasattr(teacher, "model"):
                # TCM deep-copies the training net without .eval(): the frozen model keeps dropout, with the online
                # pass's masks (new-methods.md §2.2; FastGen config_tcm.py "we leave the cm teacher in train mode")
                teacher.model.train()

    @classmethod
    def check(cls, params, cfg):
        super().check(params, cfg)
        if cfg.teacher.source != "run":
            raise ValueError("stage 2 needs the frozen stage-1 CM: set teacher {source: run, variant: <stage-1 ECT "
                             "variant>} (an analytic teacher is a denoiser, not a consistency model)")
        if math.floor(params.rho * cfg.train.batch) < 1:
            raise ValueError(f"⌊rho·train.batch⌋ = ⌊{params.rho}·{cfg.train.batch}⌋ = 0 boundary samples (the truncated "
                             f"loss then has a trivial solution): raise train.batch or loss.rho")
        if not params.t_prime < cfg.precond.sigma_max:
            raise ValueError(f"t_prime {params.t_prime} must be below precond.sigma_max {cfg.precond.sigma_max}")

    def stage(self, step):
        return (self.resume_step + step) // self.params.double_every

    def shrink(self, step):
        return max(super().shrink(step), 1 - self.params.ratio_limit)

    def __call__(self, model, target, x0, step, generator, labels=None):
        p = self.params
        draws = Draws.of(generator, x0.shape[0])
        n = draws.randn((), like=x0)
        k = math.floor(p.rho * draws.batch)         # ≥ 1 (check); TCM counts per GPU, here of the global batch
        boundary = draws.choose(k).to(x0.device)
        ln_t = truncated_t_log_sigma(n, math.log(p.t_prime), math.log(self.cfg.precond.sigma_max),
                                     p.t_loc, p.t_scale, p.t_df)
        t = torch.where(boundary, p.t_prime + 1e-8, ln_t.exp()).to(x0.dtype)
        z = draws.randn(x0.shape[1:], like=x0)
        per = self.pair_loss(model, target, x0, t, self.r_of_t(t, step), z, labels)
        # per-sample shares whose mean over the global batch B is mean_non-boundary + w_b·mean_boundary (k of B)
        return per * torch.where(boundary, p.w_boundary * draws.batch / k, draws.batch / (draws.batch - k))

    def targets(self, target, x0, t, r, z, labels):
        """r ≥ t′: stopgrad f_θ (ECT); r < t′: the frozen stage-1 model at max(r, 1e-6) (TCM floors r there, and
        evaluates f_θ₁ rather than taking x0 at r = 0), with the online pass's dropout masks."""
        frozen = r < self.params.t_prime
        col = (-1,) + (1,) * (x0.ndim - 1)
        with pieces.same_dropout(x0.device):
            online = super().targets(target, x0, t, torch.where(frozen, 0, r), z, labels)   # r = 0: not evaluated
        if not bool(frozen.any()):
            return online
        r_f = r.clamp(min=1e-6)
        return torch.where(frozen.reshape(col), self.teacher.denoise(x0 + r_f.reshape(col) * z, r_f, labels), online)
