"""EDM denoising loss (Karras et al. 2022, Eq. 2 and Table 1 'ours'): the diffusion teacher of CD, Direct CM,
sCD and ECT."""
from typing import Literal

from pydantic import Field

from cmbench.config import Strict
from cmbench.draws import Draws
from cmbench.losses import register
from cmbench.losses.base import Loss


class EDMParams(Strict):
    name: Literal["edm"]
    p_mean: float = -1.2
    p_std: float = Field(default=1.2, gt=0)


@register("edm")
class EDM(Loss):
    """ln σ ~ N(P_mean, P_std²); λ(σ) = (σ² + σ_d²)/(σ·σ_d)²; loss λ(σ)·||D_θ(x0 + σz, σ) − x0||², averaged over
    data dimensions."""
    Params = EDMParams

    @classmethod
    def check(cls, params, cfg):
        if cfg.precond.name != "edm":
            raise ValueError(f"trains a denoiser: needs precond 'edm', not {cfg.precond.name!r}")

    def __call__(self, model, target, x0, step, generator, labels=None):
        p, sd = self.params, self.cfg.precond.sigma_data
        draws = Draws.of(generator, x0.shape[0])
        n = draws.randn((), like=x0)
        sigma = (p.p_mean + p.p_std * n).exp()
        z = draws.randn(x0.shape[1:], like=x0)
        denoised = model(x0 + sigma.reshape(-1, *[1] * (x0.ndim - 1)) * z, sigma, labels)
        weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
        return weight * (denoised - x0).reshape(x0.shape[0], -1).square().mean(dim=1)
