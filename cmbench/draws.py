"""Random draws for one training step, made for the whole global batch and sliced to this rank's shard.

Every rank holds the same generator and draws the same global numbers, so a run on W ranks sees exactly the
samples and noise of a single-rank run with the same global batch; only the network work is split. Gradient
accumulation replays the step's generator state for each micro-batch and takes the next slice."""
import torch


class Draws:
    def __init__(self, generator: torch.Generator, batch: int, part: slice | None = None):
        self.generator, self.batch, self.part = generator, batch, part or slice(0, batch)

    @classmethod
    def of(cls, generator, batch: int) -> "Draws":
        """A loss may be called with a bare generator (one rank, the batch it is given)."""
        return generator if isinstance(generator, Draws) else cls(generator, batch)

    def randn(self, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """Standard normal of shape [global batch, *shape], this rank's rows."""
        return torch.randn((self.batch, *shape), generator=self.generator, device=like.device,
                           dtype=like.dtype)[self.part]

    def multinomial(self, probs: torch.Tensor) -> torch.Tensor:
        """One index per sample of the global batch (with replacement), this rank's entries."""
        probs = probs.to(self.generator.device)
        return torch.multinomial(probs, self.batch, replacement=True, generator=self.generator)[self.part]

    def choose(self, k: int) -> torch.Tensor:
        """A mask with exactly k True entries at uniformly random positions of the global batch, this rank's
        entries."""
        mask = torch.zeros(self.batch, dtype=torch.bool, device=self.generator.device)
        mask[torch.randperm(self.batch, generator=self.generator, device=self.generator.device)[:k]] = True
        return mask[self.part]
