"""Preconditioning wrappers: the network F sees scaled inputs; the wrapper returns the denoiser / consistency
function f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))."""
import torch
from torch import nn


class Precond(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1) with an optional boundary shift.

    boundary=True is the consistency-model form (Song et al. 2023, App. C): c_skip and c_out are shifted by
    σ_min so that c_skip(σ_min) = 1 and c_out(σ_min) = 0, i.e. f(x, σ_min) = x exactly.
    """

    def __init__(self, net: nn.Module, sigma_data: float, sigma_min: float, boundary: bool):
        super().__init__()
        self.net, self.sigma_data, self.sigma_min = net, sigma_data, sigma_min
        self.shift = sigma_min if boundary else 0.0

    def scalings(self, sigma: torch.Tensor):
        sd, s = self.sigma_data, sigma - self.shift
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = sd * s / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, *[1] * (x.ndim - 1)) for c in self.scalings(sigma))
        return c_skip * x + c_out * self.net(c_in * x, c_noise.reshape(-1))
