"""The one conversion between the time axes of the methods (new-methods.md §0.2).

EDM's variance-exploding path x_σ = x + σ·ε (every consistency variant here) and the linear path of the flow-map
methods, z_t = (1 − t)·x + t·ν·ε with t ∈ [0, 1] (t = 0 is data; ν = 1 for MeanFlow and Shortcut, ν = σ_d for IMM),
are one family of marginals up to a scale: z_t/(1 − t) = x + σ·ε with σ = ν·t/(1 − t). So a state and its time
convert exactly in both directions, and a flow map of one path is a flow map of the other:
Φ_{t→r}(z) = (1 − r)·Ψ_{σ(t)→σ(r)}(z/(1 − t)). Works on floats, numpy arrays and torch tensors alike."""


def t_of_sigma(sigma, nu: float = 1.0):
    """t = σ/(σ + ν): σ = 0 is t = 0, σ → ∞ is t → 1 (EDM's σ_max = 80 is t = 80/81 on the unit-noise path)."""
    return sigma / (sigma + nu)


def sigma_of_t(t, nu: float = 1.0):
    """σ = ν·t/(1 − t), for t < 1."""
    return nu * t / (1 - t)


def to_path(x_sigma, sigma, nu: float = 1.0):
    """z_t = (1 − t)·x_σ = ν·x_σ/(σ + ν): the linear path's state at t = t_of_sigma(σ)."""
    return nu * x_sigma / (sigma + nu)


def to_edm(z_t, t):
    """x_σ = z_t/(1 − t): EDM's state at σ = sigma_of_t(t), for t < 1."""
    return z_t / (1 - t)
