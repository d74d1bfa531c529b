"""Noise-level grids (pure Python: used by the config checks, the losses and the samplers)."""


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022 Eq. 5, ascending σ_1 = σ_min < ... < σ_n = σ_max (CM paper §4 convention)."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    inner = [(lo + i / (n - 1) * (hi - lo)) ** rho for i in range(1, n - 1)]
    return [sigma_min, *inner, sigma_max]    # exact endpoints, not pow round-off
