"""Preconditioning wrappers: the network F sees scaled inputs; the wrapper returns the denoiser / consistency
function f(x, σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))."""
import torch
from torch import nn

from cmbench import timeaxes


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


class FlowMap(nn.Module):
    """A two-time flow map Φ_{t→r} of the linear path z_t = (1 − t)·x + t·ν·ε (config.FlowMapSpec; new-methods.md
    §0.2, §5), seen from EDM σ-space through cmbench.timeaxes, so that samplers and evaluation written for σ-space
    (the same x_T = σ_max·ε, the exact flow of toy data) use it unchanged.

    'velocity': Φ_{t→r}(z) = z − (t − r)·u(z, r, t), u = F(z, t, h) on raw z_t, no EDM scalings (MeanFlow Eq. 12,
    §1.3; t = 1 would be σ = ∞). 'trigflow': IMM's `simple_edm` form on the σ_d path (§4.3), with α_t = 1 − t,
    ρ_t = √(α_t² + t²): Φ_{t→s}(z) = (α_tα_s + ts)/ρ_t²·z − (α_s t − α_t s)·σ_d/ρ_t·F(z/(σ_d ρ_t), t, s)."""

    def __init__(self, net: nn.Module, spec, sigma_data: float):
        super().__init__()
        self.net, self.spec, self.sigma_data = net, spec, sigma_data
        self.nu = sigma_data if spec.path == "fm_sd" else 1.0

    def times(self, t: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The net's two time inputs: scale·t and scale·(t − r) ('gap'), scale·r ('end') or scale·log2(1/(t − r))
        ('log2_gap': Shortcut's integer step label k for d = 2^−k; r < t)."""
        k, second = self.spec.time_scale, self.spec.second
        return k * t, k * (t - r if second == "gap" else r if second == "end" else -torch.log2(t - r))

    def u(self, z_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None):
        """The average velocity of a 'velocity' model (differentiable in z_t, r and t: no clipping here)."""
        c1, c2 = self.times(t, r)
        return self.net(z_t, c1, labels, c2)

    def step(self, z_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None):
        """Φ_{t→r}(z_t) on the model's own path; t and r are per-sample [B]."""
        col = (-1,) + (1,) * (z_t.ndim - 1)
        if self.spec.output == "velocity":
            return z_t - (t - r).reshape(col) * self.u(z_t, r, t, labels)
        a_t, a_s = 1 - t, 1 - r
        rho = (a_t**2 + t**2).sqrt()
        c_skip, c_out = (a_t * a_s + t * r) / rho**2, -(a_s * t - a_t * r) * self.sigma_data / rho
        c1, c2 = self.times(t, r)
        f = self.net(z_t / (self.sigma_data * rho).reshape(col), c1, labels, c2)
        return c_skip.reshape(col) * z_t + c_out.reshape(col) * f

    def jump(self, x: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor,
             labels: torch.Tensor | None = None) -> torch.Tensor:
        """EDM state x at σ_from → EDM state at σ_to ≤ σ_from, both times clipped to the trained [t_min, t_max]
        (IMM's sampler ends at t_min = 0.006, whose state is returned: new-methods.md §4.6)."""
        b = x.shape[0]
        s_from, s_to = (s.to(x.dtype).reshape(-1).expand(b) for s in (sigma_from, sigma_to))
        t = timeaxes.t_of_sigma(s_from, self.nu).clamp(self.spec.t_min, self.spec.t_max)
        r = timeaxes.t_of_sigma(s_to, self.nu).clamp(self.spec.t_min, self.spec.t_max)
        z = timeaxes.to_path(x, s_from.reshape((-1,) + (1,) * (x.ndim - 1)), self.nu)
        return timeaxes.to_edm(self.step(z, r, t, labels), r.reshape((-1,) + (1,) * (x.ndim - 1)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The consistency function f(x, σ) = Φ_{σ→0}(x): a clean-data estimate, as every other model's."""
        return self.jump(x, sigma, torch.zeros_like(sigma.reshape(-1)[:1]), labels)
