"""Improved consistency training (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models")."""
from typing import Literal

from pydantic import Field

from cmbench.losses import pieces, register
from cmbench.losses.consistency import DiscreteConsistencyLoss, DiscreteParams


class ICTParams(DiscreteParams):
    name: Literal["ict"]
    s0: int = Field(default=10, ge=2)
    s1: int = Field(default=1280, ge=2)
    p_mean: float = -1.1
    p_std: float = Field(default=2.0, gt=0)
    distance: pieces.Distance = "pseudo_huber"
    weighting: pieces.Weighting = "inv_delta"


@register("ict")
class ICT(DiscreteConsistencyLoss):
    """Doubling curriculum, discretised lognormal pairs, Pseudo-Huber, λ = 1/(σ_{i+1} − σ_i), and no EMA
    teacher: θ⁻ = stopgrad(θ) (papers.md §3.1)."""
    Params = ICTParams

    def discretization(self, step):
        return pieces.ict_discretization(step, self.total_steps, self.params.s0, self.params.s1)

    def pair_probs(self, sigmas):
        return pieces.lognormal_pair_probs(sigmas, self.params.p_mean, self.params.p_std)
