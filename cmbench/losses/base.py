"""What every registered loss provides (NVlabs/edm style: the loss returns per-sample values, the loop reduces)."""
from abc import ABC, abstractmethod

import torch

from cmbench.config import RunConfig, Strict


class Loss(ABC):
    Params: type[Strict]
    needs_teacher = False
    # what the teacher run is to the loss: a diffusion model's denoiser (CD, sCD, Direct CM, and the runs started from
    # its weights), or a consistency model it builds on (TCM's stage 1), whose Heun ODE solution means nothing
    teacher_kind = "denoiser"

    def __init__(self, params: Strict, cfg: RunConfig, teacher=None, model=None):
        """`model`: the network being trained, for a loss whose learned parts are sized by it (sCM)."""
        self.params, self.cfg, self.teacher = params, cfg, teacher
        self.module: torch.nn.Module | None = None   # learned parts of the loss, optimised with the model

    @classmethod
    def check(cls, params: Strict, cfg: RunConfig) -> None:
        """Raise ValueError for a combination of loss and config that cannot work."""

    @abstractmethod
    def __call__(self, model, target, x0: torch.Tensor, step: int, generator,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """Unreduced per-sample loss [B]. `target` is the target network, or the model itself (θ⁻ = stopgrad θ).
        `generator`: a torch.Generator, or cmbench.draws.Draws when x0 is one rank's shard of a global batch.
        `labels`: class indices [B] of conditional data (every network and teacher call gets them), else None.
        A loss that evaluates the network twice on related inputs runs the first pass under
        pieces.same_dropout, so that the second draws the same dropout masks."""

    def target_ema(self, step: int) -> float | None:
        """μ(k) for a separate target network θ⁻; None: θ⁻ = stopgrad(θ), no target network is kept."""
        return None

    def stats(self, step: int) -> dict:
        return {}
