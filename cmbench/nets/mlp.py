"""MLP backbone for toy data: F(x, c_noise[, c_noise2]) with a sin/cos embedding of each time input."""

import torch
from torch import nn


class NoiseEmbedding(nn.Module):
    """sin/cos features of c_noise at geometrically spaced frequencies 1 .. max_freq (a low top frequency
    suits toy data: calibration.md)."""

    def __init__(self, features: int, max_freq: float):
        super().__init__()
        assert features % 2 == 0, "emb_features must be even (sin and cos pairs)"
        freqs = max_freq ** torch.linspace(0, 1, features // 2, dtype=torch.float64)
        self.register_buffer("freqs", freqs.float())

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class MLP(nn.Module):
    """time2 (a second time input, for the two-time flow-map methods: new-methods.md §5) is 'none', 'concat' or
    'add': an MLP has no embedding network to add into, so both give the second time its own sin/cos features
    beside the first's in the input (the U-Nets tell the two apart)."""

    def __init__(self, dim: int, width: int, depth: int, emb_features: int, emb_max_freq: float,
                 time2: str = "none"):
        super().__init__()
        self.noise_features = (emb_features, emb_max_freq)   # the time features that suit this net (sCM's w_φ)
        self.embed = NoiseEmbedding(emb_features, emb_max_freq)
        self.embed2 = NoiseEmbedding(emb_features, emb_max_freq) if time2 != "none" else None
        layers, fan_in = [], dim + emb_features * (1 if self.embed2 is None else 2)
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.SiLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None,
                c_noise2: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            raise ValueError("the toy MLP is unconditional")
        features = [x, self.embed(c_noise)]
        if check_time2(self.embed2 is not None, c_noise2):
            features.append(self.embed2(c_noise2))
        return self.layers(torch.cat(features, dim=1))


def check_time2(two_times: bool, c_noise2: torch.Tensor | None) -> bool:
    """Whether the net takes a second time input: a net built for one is called with one, and no other."""
    if two_times != (c_noise2 is not None):
        raise ValueError("a two-time net needs c_noise2" if two_times else "c_noise2 given to a one-time net")
    return two_times
