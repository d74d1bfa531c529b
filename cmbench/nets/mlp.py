"""MLP backbone for toy data: F(x, c_noise) with a sin/cos embedding of c_noise."""

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
    def __init__(self, dim: int, width: int, depth: int, emb_features: int, emb_max_freq: float):
        super().__init__()
        self.noise_features = (emb_features, emb_max_freq)   # the time features that suit this net (sCM's w_φ)
        self.embed = NoiseEmbedding(emb_features, emb_max_freq)
        layers, fan_in = [], dim + emb_features
        for _ in range(depth):
            layers += [nn.Linear(fan_in, width), nn.SiLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is not None:
            raise ValueError("the toy MLP is unconditional")
        return self.layers(torch.cat([x, self.embed(c_noise)], dim=1))
