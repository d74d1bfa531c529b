"""Closed-form ground truth of Gaussian data x ~ N(μ, s²) on the linear path z_t = (1 − t)·x + t·ν·ε
(new-methods.md §0.3), written independently of cmbench's own conversions so that tests can check them. Torch,
any dtype; t and r broadcast against z. ν = 1: MeanFlow / Shortcut; ν = σ_d: IMM."""
import torch

MU, S = 0.3, 0.5


def mean(t, mu=MU):
    return (1 - t) * mu


def std(t, s=S, nu=1.0):
    return ((1 - t) ** 2 * s**2 + nu**2 * t**2) ** 0.5


def flow(z, t, r, mu=MU, s=S, nu=1.0):
    """Φ_{t→r}(z) = m_r + (S_r/S_t)(z − m_t): the standardised coordinate is conserved."""
    return mean(r, mu) + std(r, s, nu) / std(t, s, nu) * (z - mean(t, mu))


def velocity(z, t, mu=MU, s=S, nu=1.0):
    """v(z, t) = −μ + (Ṡ_t/S_t)(z − m_t), Ṡ_t/S_t = (ν²t − (1 − t)s²)/V_t."""
    return -mu + (nu**2 * t - (1 - t) * s**2) / std(t, s, nu) ** 2 * (z - mean(t, mu))


def average_velocity(z, r, t, mu=MU, s=S, nu=1.0):
    """u*(z, r, t) = (z − Φ_{t→r}(z))/(t − r), and v(z, t) where r = t."""
    t, r = torch.as_tensor(t, dtype=z.dtype), torch.as_tensor(r, dtype=z.dtype)
    gap = t - r
    safe = torch.where(gap > 0, gap, torch.ones_like(gap))
    return torch.where(gap > 0, (z - flow(z, t, r, mu, s, nu)) / safe, velocity(z, t, mu, s, nu))


def edm_flow(x, sigma_from, sigma_to, mu=MU, s=S):
    """Ψ_{σ→σ'}(x) = μ + √((s² + σ'²)/(s² + σ²))·(x − μ) of EDM's path x + σ·ε."""
    return mu + ((s**2 + sigma_to**2) / (s**2 + sigma_from**2)) ** 0.5 * (x - mu)
