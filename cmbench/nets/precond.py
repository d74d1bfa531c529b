"""Preconditioning wrappers: the network F sees scaled inputs; the wrapper returns the denoiser / consistency
function f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))."""
import torch
from torch import nn


class Precond(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1) with an optional boundary shift.

    boundary=True is the consistency-model form (Song et al. 2023, App. C): c_skip and c_out are shifted by
    σ_min so that c_skip(σ_min) = 1 and c_out(σ_min) = 0, i.e. f(x, σ_min) = x exactly.
    """

    def __init__(self, net: nn.Module, sigma_data: float, sigma_min: float, boundary: bool, c_noise_scale: float = 1.0):
        super().__init__()
        self.net, self.sigma_data, self.sigma_min = net, sigma_data, sigma_min
        self.shift = sigma_min if boundary else 0.0
        self.c_noise_scale = c_noise_scale

    def scalings(self, sigma: torch.Tensor):
        sd, s = self.sigma_data, sigma - self.shift
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = sd * s / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = self.c_noise_scale * sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        sigma = sigma.to(x.dtype).reshape(-1).expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, *[1] * (x.ndim - 1)) for c in self.scalings(sigma))
        return c_skip * x + c_out * self.net(c_in * x, c_noise.reshape(-1), labels)


class TrigFlow(nn.Module):
    """The sCM consistency model in TrigFlow time (Lu & Song 2024, §2; papers.md §5.1).

    edm_net: the network is an EDM-preconditioned denoiser's F (a trained EDM teacher's weights). With
    σ = σ_d·tan t, EDM's scalings become c_in·x_σ = x_t/σ_d, c_skip·x_σ = cos t·x_t and c_out = σ_d·sin t, so
    D_EDM(x_σ, σ) = cos t·x_t + σ_d sin t·F_EDM(x_t/σ_d, ¼ ln σ): the TrigFlow F is −F_EDM at c_noise = ¼ ln(σ_d tan t)
    and the wrapped net's denoiser is the EDM denoiser exactly. This is how sCM starts from its teacher (App. B.2,
    G.2) when the teacher was trained in EDM's parameterisation rather than retrained in TrigFlow."""

    def __init__(self, net: nn.Module, sigma_data: float, edm_net: bool = False, c_noise_scale: float = 1.0):
        super().__init__()
        self.net, self.sigma_data, self.edm_net, self.c_noise_scale = net, sigma_data, edm_net, c_noise_scale

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """F_θ(x_t/σ_d, c_noise(t)) with c_noise(t) = t: EDM's ln σ would blow up its derivative near π/2 (a
        wrapped EDM net keeps its ¼ ln(σ_d tan t): the JVP's tangent cos t·sin t keeps that term bounded)."""
        if self.edm_net:
            return -self.net(x_t / self.sigma_data, self.c_noise_scale * (self.sigma_data * t.tan()).log() / 4, labels)
        return self.net(x_t / self.sigma_data, t, labels)

    def consistency(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """f(x_t, t) = cos t·x_t − sin t·σ_d·F_θ(x_t/σ_d, t): one first-order step to t = 0, so f(x, 0) = x."""
        cos, sin = (v.reshape(-1, *[1] * (x_t.ndim - 1)) for v in (t.cos(), t.sin()))
        return cos * x_t - sin * self.sigma_data * self.raw(x_t, t, labels)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The same model in EDM σ-space (sCM App. B.2: t = arctan(σ/σ_d), x_t = cos t·x_σ), so samplers and
        evaluation written for σ-space use it unchanged; the output is a clean-data estimate in either space."""
        t = torch.atan(sigma.to(x.dtype).reshape(-1).expand(x.shape[0]) / self.sigma_data)
        return self.consistency(t.cos().reshape(-1, *[1] * (x.ndim - 1)) * x, t, labels)
