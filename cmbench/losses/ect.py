"""Easy Consistency Tuning (Geng et al. 2024, "Consistency Models Made Easy"; papers.md §4.2).

Continuous t with a stage-wise shrinking gap t − r: at stage 0 much of the range has r = 0 (a denoising
target, i.e. the diffusion model it starts from); each stage moves r towards t."""
from typing import Literal

import torch
from pydantic import Field

from cmbench.config import Strict
from cmbench.draws import Draws
from cmbench.losses import pieces, register
from cmbench.losses.base import Loss


class ECTParams(Strict):
    name: Literal["ect"]
    p_mean: float = -1.1                                # t ~ lognormal (CIFAR-10; ImageNet-64 −0.8 / 1.6)
    p_std: float = Field(default=2.0, gt=0)
    q: float = Field(default=2.0, gt=1)                 # gap shrink factor per stage (CIFAR-10 2, ImageNet-64 4)
    k: float = Field(default=8.0, ge=0)
    b: float = Field(default=1.0, ge=0)
    mapping: Literal["sigmoid", "constant"] = "sigmoid"
    double_every: int = Field(default=25_000, gt=0)     # steps per stage (CIFAR-10: 3.2 Mimg at batch 128)
    huber_c: float = Field(default=0.0, ge=0)           # sqrt(Δ + c²) − c; 0 (CIFAR-10) is sqrt(Δ), 0.06 ImageNet-64
    weighting: Literal["inv_delta", "snr"] = "inv_delta"  # 1/(t − r) (CIFAR-10) or 1/t² + 1/σ_d² (ImageNet-64)


@register("ect")
class ECT(Loss):
    """d(f_θ(x0 + t·z, t), stopgrad f_θ(x0 + r·z, r))·w(t, r), same z; the target is x0 itself where r = 0."""
    Params = ECTParams

    @classmethod
    def check(cls, params, cfg):
        if cfg.precond.name != "edm":
            raise ValueError("ECT trains with EDM's unshifted scalings (papers.md §4.2): needs precond 'edm'")

    def stage(self, step: int) -> int:
        return step // self.params.double_every

    def shrink(self, step: int) -> float:
        """1 − ratio = q^−(a+1) at stage a (ECT training/loss.py)."""
        return self.params.q ** -(self.stage(step) + 1)

    def r_of_t(self, t: torch.Tensor, step: int) -> torch.Tensor:
        """r = t·(1 − q^−(a+1)·(1 + k·sigmoid(−b·t))), clipped at 0 (ECT training/loss.py); `constant` drops the
        sigmoid term."""
        p = self.params
        shrink = self.shrink(step)
        if p.mapping == "sigmoid":
            shrink = shrink * (1 + p.k * torch.sigmoid(-p.b * t))
        return (t * (1 - shrink)).clamp(min=0)

    def stats(self, step):
        return {"stage": self.stage(step)}

    def __call__(self, model, target, x0, step, generator, labels=None):
        p = self.params
        draws = Draws.of(generator, x0.shape[0])
        n = draws.randn((), like=x0)
        t = (p.p_mean + p.p_std * n).exp()
        z = draws.randn(x0.shape[1:], like=x0)
        return self.pair_loss(model, target, x0, t, self.r_of_t(t, step), z, labels)

    @staticmethod
    def at_r(net, x0, t, r, z, labels):
        """f(x0 + r·z, r) by `net`, x0 itself where r = 0. The whole batch is evaluated, so that its dropout masks
        line up with the online pass (as ECT's code); where r = 0 the network's output there (run at t, not at
        c_noise = ¼ ln 0) is discarded."""
        col = (-1,) + (1,) * (x0.ndim - 1)
        keep = r > 0
        if not bool(keep.any()):
            return x0
        r_net = torch.where(keep, r, t)
        return torch.where(keep.reshape(col), net(x0 + r_net.reshape(col) * z, r_net, labels), x0)

    def targets(self, target, x0, t, r, z, labels):
        """The stop-gradient target of each sample (ECT: the online network itself, θ⁻ = stopgrad θ)."""
        return self.at_r(target, x0, t, r, z, labels)

    def pair_loss(self, model, target, x0, t, r, z, labels):
        """w(t, r)·d(f_θ(x0 + t·z, t), stopgrad target) per sample."""
        p, sd = self.params, self.cfg.precond.sigma_data
        col = (-1,) + (1,) * (x0.ndim - 1)
        with pieces.same_dropout(x0.device):
            pred = model(x0 + t.reshape(col) * z, t, labels)
        with torch.no_grad():
            tgt = self.targets(target, x0, t, r, z, labels)
        weight = pieces.inv_delta_weight(r, t) if p.weighting == "inv_delta" else 1 / t**2 + 1 / sd**2
        return weight * pieces.pseudo_huber(pred, tgt, p.huber_c)
