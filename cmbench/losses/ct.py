"""Original consistency training (Song, Dhariwal, Chen, Sutskever 2023, §5, Alg. 3, App. C)."""
from typing import Literal

from pydantic import Field

from cmbench.losses import pieces, register
from cmbench.losses.consistency import DiscreteConsistencyLoss, DiscreteParams


class CTParams(DiscreteParams):
    name: Literal["ct"]
    s0: int = Field(default=2, ge=2)
    s1: int = Field(default=150, ge=2)
    mu0: float = Field(default=0.9, ge=0, lt=1)
    # "paper": μ(k) = exp(s0 ln μ0 / N(k)); "code": the released code's N(k) − 1 (papers.md §9.1)
    mu_rule: Literal["paper", "code"] = "paper"
    distance: pieces.Distance = "l2"   # the paper used LPIPS on images
    weighting: pieces.Weighting = "uniform"  # λ ≡ 1 (CM paper §4)


@register("ct")
class CT(DiscreteConsistencyLoss):
    """Uniform pair index on a Karras grid whose size N(k) grows as a square root; target network EMA μ(k)."""
    Params = CTParams

    def discretization(self, step):
        return pieces.ct_discretization(step, self.total_steps, self.params.s0, self.params.s1)

    def pair_probs(self, sigmas):
        return pieces.uniform_pair_probs(sigmas)

    def target_ema(self, step):
        p = self.params
        return pieces.ct_target_ema(step, self.total_steps, p.s0, p.s1, p.mu0, p.mu_rule)
