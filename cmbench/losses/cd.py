"""Consistency distillation (Song et al. 2023, Def. 1, Alg. 2) and Direct CM (Vouitsis et al. 2024, §3).

Both follow a teacher denoiser on a fixed Karras grid of N points with a uniform pair index; they differ only
in the target: CD takes one teacher ODE step from σ_{i+1} to σ_i and bootstraps through the target network
there, Direct CM solves the teacher ODE all the way down to σ_min with the same solver (papers.md §6.3)."""
from typing import Literal

from pydantic import Field

from cmbench import solvers
from cmbench.losses import pieces, register
from cmbench.losses.consistency import DiscreteConsistencyLoss, DiscreteParams


class CDParams(DiscreteParams):
    name: Literal["cd"]
    n: int = Field(default=18, ge=2)                    # grid size N (18 on CIFAR-10, 40 on ImageNet-64)
    mu: float = Field(default=0.0, ge=0, lt=1)          # target EMA; 0: θ⁻ = θ after each step (CIFAR-10)
    solver: Literal[tuple(solvers.STEPS)] = "heun"
    distance: pieces.Distance = "l2"   # the paper's best was LPIPS on images
    weighting: pieces.Weighting = "uniform"  # λ ≡ 1 (CM paper §4)


@register("cd")
class CD(DiscreteConsistencyLoss):
    Params = CDParams
    needs_teacher = True

    @classmethod
    def check(cls, params, cfg):
        if cfg.precond.name != "cm":
            raise ValueError(f"needs precond 'cm' (the boundary f(x, σ_min) = x), not {cfg.precond.name!r}")

    def discretization(self, step):
        return self.params.n

    def pair_probs(self, sigmas):
        return pieces.uniform_pair_probs(sigmas)

    def target_ema(self, step):
        return self.params.mu

    def target(self, target, x0, z, x_hi, sig_lo, sig_hi, i, sigmas, labels):
        x_lo = solvers.STEPS[self.params.solver](self.teacher.denoise, x_hi, sig_hi, sig_lo, labels)
        return target(x_lo, sig_lo, labels)


class DirectCMParams(CDParams):
    name: Literal["direct_cm"]
    mu: float = Field(default=0.0, ge=0, le=0)          # no target network: the target is the teacher's ODE solution


@register("direct_cm")
class DirectCM(CD):
    Params = DirectCMParams

    def target_ema(self, step):
        return None

    def target(self, target, x0, z, x_hi, sig_lo, sig_hi, i, sigmas, labels):
        # f_θ⁻(x, σ_min) = x under the CM boundary condition, so the solver's endpoint is the target itself
        return solvers.solve_down(self.teacher.denoise, x_hi, sigmas, i + 1, 0, self.params.solver, labels)
