"""The discrete-time consistency loss shared by CT and iCT (and, later, CD-style targets)."""
from abc import abstractmethod
import torch
from pydantic import Field

from cmbench.config import RunConfig, Strict
from cmbench.draws import Draws
from cmbench.losses import pieces
from cmbench.losses.base import Loss


class DiscreteParams(Strict):
    distance: pieces.Distance
    huber_c: float | None = Field(default=None, gt=0)      # None: iCT's 0.00054·sqrt(D)
    weighting: pieces.Weighting


class DiscreteConsistencyLoss(Loss):
    """λ(σ_i, σ_{i+1}) · d( f_θ(x + σ_{i+1} z, σ_{i+1}), target ) on a Karras grid. The target is, by default,
    stopgrad f_θ⁻(x + σ_i z, σ_i) with the same z (consistency training: Song et al. 2023, Alg. 3, Thm. 2);
    distillation replaces it (`target`). Subclasses choose N(k), the pairing p(i), μ(k) and the target."""

    def __init__(self, params: DiscreteParams, cfg: RunConfig, teacher=None, model=None):
        super().__init__(params, cfg, teacher, model)
        self.total_steps = cfg.train.steps
        p = cfg.precond
        self.sigma_min, self.sigma_max, self.rho = p.sigma_min, p.sigma_max, p.rho
        self.weight = pieces.WEIGHTINGS[params.weighting]
        c = params.huber_c if params.huber_c is not None else pieces.ict_huber_c(cfg.dataset.dim)
        self.distance = pieces.distance(params.distance, c)

    @abstractmethod
    def discretization(self, step: int) -> int:
        """N(k): number of grid points at training step k."""

    @abstractmethod
    def pair_probs(self, sigmas: torch.Tensor) -> torch.Tensor:
        """p(i) over the N − 1 adjacent pairs of the grid."""

    def target(self, target, x0, z, x_hi, sig_lo, sig_hi, i, sigmas, labels) -> torch.Tensor:
        """CT: the target network at the same noise z, one grid point down (Song et al. 2023, Alg. 3)."""
        return target(x0 + sig_lo.reshape(-1, *[1] * (x0.ndim - 1)) * z, sig_lo, labels)

    def stats(self, step: int) -> dict:
        out = {"N": self.discretization(step)}
        mu = self.target_ema(step)
        if mu is not None:
            out["mu"] = mu
        return out

    def __call__(self, model, target, x0: torch.Tensor, step: int, generator: torch.Generator,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        sigmas = pieces.karras_sigmas(self.discretization(step), self.sigma_min, self.sigma_max, self.rho)
        draws = Draws.of(generator, x0.shape[0])
        i = draws.multinomial(self.pair_probs(sigmas))
        sig_lo, sig_hi = (s.to(x0.device, x0.dtype) for s in (sigmas[i], sigmas[i + 1]))
        z = draws.randn(x0.shape[1:], like=x0)
        x_hi = x0 + sig_hi.reshape(-1, *[1] * (x0.ndim - 1)) * z
        with pieces.same_dropout(x0.device):
            pred = model(x_hi, sig_hi, labels)
        with torch.no_grad():
            tgt = self.target(target, x0, z, x_hi, sig_lo, sig_hi, i, sigmas, labels)
        return self.weight(sig_lo, sig_hi) * self.distance(pred, tgt)
