"""The exact maths of consistency training (CT) on Gaussian data (papers.md §2.3, §8.1, §8.4): the data law and
the Karras grid, the exact consistency map, the moments of (x0, z), one CT least-squares step, the recursions over
the grid, the exact W2 of an affine sampler's Gaussian output, and log-log rates. numpy only."""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from cmbench.grids import karras_sigmas

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
CASES = ("isotropic", "loguniform")
PRIORS = ("true", "sampler")


# ----------------------------------------------------------------------------------------------------
# Data, grid and exact consistency map
# ----------------------------------------------------------------------------------------------------
def data_params(d: int, case: str, mu: float = 0.3, s: float = 0.5, s_lo: float = 0.05,
                s_hi: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate mean and std of the data law N(μ·1, diag(std²)).

    ``isotropic``: std = s everywhere. ``loguniform``: std at the d mid-quantiles of a log-uniform law on
    [s_lo, s_hi] (deterministic, so a given d always gets the same spectrum)."""
    mean = np.full(d, float(mu))
    if case == "isotropic":
        return mean, np.full(d, float(s))
    if case == "loguniform":
        return mean, s_lo * (s_hi / s_lo) ** ((np.arange(d) + 0.5) / d)
    raise ValueError(f"unknown case {case!r}; expected one of {CASES}")


def karras_grid(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                rho: float = RHO) -> np.ndarray:
    """Ascending Karras grid σ_1 = σ_min < ... < σ_n = σ_max as an array."""
    return np.asarray(karras_sigmas(n, sigma_min, sigma_max, rho), dtype=np.float64)


def exact_map(mean, var, sigma: float, sigma_min: float = SIGMA_MIN) -> tuple[np.ndarray, np.ndarray]:
    """Slope and offset of the exact consistency map f*(x, σ) = a x + b (papers.md §8.1, per coordinate):
    a = sqrt((s² + σ_min²)/(s² + σ²)), b = μ (1 − a)."""
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    a = np.sqrt((var + sigma_min ** 2) / (var + sigma ** 2))
    return a, mean * (1 - a)


# ----------------------------------------------------------------------------------------------------
# Moments of (x0, z) and one CT regression step
# ----------------------------------------------------------------------------------------------------
class Moments(NamedTuple):
    """Means and centred second moments (normalised by n) of (x0, z).

    Diagonal model: every field has the coordinate shape (...,). Full model: mx, mz (..., d) and
    sxx, sxz, szz (..., d, d) with sxz[j, k] = mean((x0_j − mx_j)(z_k − mz_k))."""
    mx: np.ndarray
    mz: np.ndarray
    sxx: np.ndarray
    sxz: np.ndarray
    szz: np.ndarray


def population_moments(mean, var) -> Moments:
    """Exact moments of x0 ~ N(mean, diag(var)), z ~ N(0, I) independent (diagonal layout)."""
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    zero = np.zeros_like(mean)
    return Moments(mean, zero, var, zero, np.ones_like(mean))


def moments_from_samples(x0, z, full: bool = False) -> Moments:
    """Sample moments of paired draws x0, z [n, ...] (``full``: [n, d] with cross-coordinate blocks)."""
    x0, z = np.asarray(x0, dtype=np.float64), np.asarray(z, dtype=np.float64)
    n = len(x0)
    mx, mz = x0.mean(0), z.mean(0)
    xc, zc = x0 - mx, z - mz
    if full:
        return Moments(mx, mz, xc.T @ xc / n, xc.T @ zc / n, zc.T @ zc / n)
    return Moments(mx, mz, (xc * xc).mean(0), (xc * zc).mean(0), (zc * zc).mean(0))


def draw_moments_diag(rngs: Sequence[np.random.Generator], mean, std, n: int) -> Moments:
    """The moments of n fresh i.i.d. draws of (x0, z), per coordinate, drawn from their exact sampling law
    (one row per generator): sample means ~ N(·, ·/n), centred scatter ~ Wishart(n − 1, ·) (Bartlett:
    W = L Lᵀ, L = [[c1, 0], [g, c2]], c1² ~ χ²(n−1), c2² ~ χ²(n−2), g ~ N(0, 1)), independent.
    Equal in law to ``moments_from_samples`` on n samples, at O(1) instead of O(n) cost per coordinate."""
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    k = mean.shape
    df = np.array([n - 1, n - 2], dtype=np.float64).reshape((2,) + (1,) * len(k))
    chi = np.stack([r.chisquare(df, size=(2,) + k) for r in rngs])                     # [S, 2, *k]
    g = np.stack([r.standard_normal((3,) + k) for r in rngs])                          # [S, 3, *k]
    wuu, wuz, wzz = chi[:, 0], np.sqrt(chi[:, 0]) * g[:, 0], g[:, 0] ** 2 + chi[:, 1]
    return Moments(mean + std * g[:, 1] / np.sqrt(n), g[:, 2] / np.sqrt(n),
                   std ** 2 * wuu / n, std * wuz / n, wzz / n)


def draw_moments_full(rngs: Sequence[np.random.Generator], mean, std, n: int) -> Moments:
    """Full-covariance version of ``draw_moments_diag``: the 2d × 2d scatter of (u, z), x0 = μ + diag(std) u,
    is Wishart(n − 1, I_{2d}) by the Bartlett decomposition; leading axis = generator."""
    mean, std = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    d = len(mean)
    k = 2 * d
    if n - 1 < k:
        raise ValueError(f"n_samples = {n} too small for a full {d}-dim fit (needs n > {k})")
    rows, cols = np.tril_indices(k, -1)
    diag = np.arange(k)
    n_off = len(rows)
    lower, means = np.zeros((len(rngs), k, k)), np.empty((len(rngs), k))
    for i, r in enumerate(rngs):
        lower[i, diag, diag] = np.sqrt(r.chisquare(n - 1 - diag))
        g = r.standard_normal(n_off + k)
        lower[i, rows, cols] = g[:n_off]
        means[i] = g[n_off:] / np.sqrt(n)
    w = lower @ np.ascontiguousarray(lower.swapaxes(-1, -2))   # a strided operand falls off the BLAS path
    wuu, wuz, wzz = w[:, :d, :d], w[:, :d, d:], w[:, d:, d:]
    return Moments(mean + std * means[:, :d], means[:, d:],
                   std[:, None] * wuu * std[None, :] / n, std[:, None] * wuz / n, wzz / n)


def ct_step_diag(a, b, m: Moments, sig_lo: float, sig_hi: float, slope_factor: float = 1.0):
    """One CT regression step, per coordinate: least squares of the target T = a (x0 + σ_lo z) + b on the
    input X = x0 + σ_hi z (same z) under the moments m. Returns (a', b') with
    a' = Cov(T, X)/Var(X) (times ``slope_factor``, a controlled perturbation) and b' = E[T] − a' E[X]
    (the least-squares intercept given the slope)."""
    cov_tx = a * (m.sxx + (sig_lo + sig_hi) * m.sxz + sig_lo * sig_hi * m.szz)
    var_x = m.sxx + 2 * sig_hi * m.sxz + sig_hi ** 2 * m.szz
    a_new = slope_factor * cov_tx / var_x
    b_new = a * (m.mx + sig_lo * m.mz) + b - a_new * (m.mx + sig_hi * m.mz)
    return a_new, b_new


def ct_step_full(A, b, m: Moments, sig_lo: float, sig_hi: float):
    """Full-affine CT step (batched over leading axes): A' = Cov(T, X) Var(X)^{-1}, b' = E[T] − A' E[X] for
    T = A (x0 + σ_lo z) + b, X = x0 + σ_hi z."""
    szx = m.sxz.swapaxes(-1, -2)
    cov_yx = m.sxx + sig_hi * m.sxz + sig_lo * szx + sig_lo * sig_hi * m.szz   # Cov(x0 + σ_lo z, X)
    var_x = m.sxx + sig_hi * (m.sxz + szx) + sig_hi ** 2 * m.szz
    A_new = np.linalg.solve(var_x, (A @ cov_yx).swapaxes(-1, -2)).swapaxes(-1, -2)
    ey, ex = m.mx + sig_lo * m.mz, m.mx + sig_hi * m.mz
    b_new = (A @ ey[..., None])[..., 0] + b - (A_new @ ex[..., None])[..., 0]
    return A_new, b_new


def ct_step_lstsq(A, b, x0, z, sig_lo: float, sig_hi: float):
    """Reference CT step by an explicit least-squares fit on samples x0, z [n, d] (slow; for tests)."""
    x0, z = np.asarray(x0, dtype=np.float64), np.asarray(z, dtype=np.float64)
    target = (x0 + sig_lo * z) @ np.asarray(A).T + b
    design = np.column_stack([x0 + sig_hi * z, np.ones(len(x0))])
    coef = np.linalg.lstsq(design, target, rcond=None)[0]
    return coef[:-1].T, coef[-1]


# ----------------------------------------------------------------------------------------------------
# Recursions over the grid
# ----------------------------------------------------------------------------------------------------
def population_recursion(mean, var, sigmas, slope_factor: float = 1.0):
    """Population CT recursion from f_1 = identity over the ascending grid ``sigmas``; returns (a_N, b_N)
    per coordinate. ``slope_factor`` multiplies each fitted slope (controlled per-step perturbation)."""
    m = population_moments(mean, var)
    a, b = np.ones_like(m.mx), np.zeros_like(m.mx)
    for lo, hi in zip(sigmas[:-1], sigmas[1:]):
        a, b = ct_step_diag(a, b, m, lo, hi, slope_factor)
    return a, b


def sampled_recursion_diag(rngs: Sequence[np.random.Generator], mean, std, sigmas, n: int):
    """CT recursion with every step fitted on n fresh samples (diagonal model); returns (a_N, b_N) with a
    leading axis over the generators."""
    a = np.ones((len(rngs),) + np.shape(mean))
    b = np.zeros_like(a)
    for lo, hi in zip(sigmas[:-1], sigmas[1:]):
        a, b = ct_step_diag(a, b, draw_moments_diag(rngs, mean, std, n), lo, hi)
    return a, b


def sampled_recursion_full(rngs: Sequence[np.random.Generator], mean, std, sigmas, n: int):
    """CT recursion with full d × d affine maps, each step fitted on n fresh samples; returns (A_N, b_N)
    with a leading axis over the generators."""
    d = len(mean)
    A = np.broadcast_to(np.eye(d), (len(rngs), d, d)).copy()
    b = np.zeros((len(rngs), d))
    for lo, hi in zip(sigmas[:-1], sigmas[1:]):
        A, b = ct_step_full(A, b, draw_moments_full(rngs, mean, std, n), lo, hi)
    return A, b


# ----------------------------------------------------------------------------------------------------
# Output law and exact W2 (papers.md §8.4)
# ----------------------------------------------------------------------------------------------------
def prior_law(prior: str, mean, var, sigma_max: float = SIGMA_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Mean and per-coordinate variance of the sampler input: ``true`` p_{σ_max} = N(μ, s² + σ_max²),
    ``sampler`` N(0, σ_max²)."""
    mean, var = np.asarray(mean, dtype=np.float64), np.asarray(var, dtype=np.float64)
    if prior == "true":
        return mean, var + sigma_max ** 2
    if prior == "sampler":
        return np.zeros_like(mean), np.full_like(var, sigma_max ** 2)
    raise ValueError(f"unknown prior {prior!r}; expected one of {PRIORS}")


def affine_output_diag(a, b, m_in, v_in) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of a x + b for x ~ N(m_in, diag(v_in)) (per coordinate)."""
    return a * m_in + b, np.abs(a) * np.sqrt(v_in)


def w2_diag(m1, sd1, m2, sd2) -> np.ndarray:
    """W2 between N(m1, diag(sd1²)) and N(m2, diag(sd2²)), summing over the last axis:
    sqrt(||m1 − m2||² + Σ_j (sd1_j − sd2_j)²); isotropic: sqrt(||Δm||² + d (s1 − s2)²)."""
    return np.sqrt((((np.asarray(m1) - m2) ** 2) + (np.asarray(sd1) - sd2) ** 2).sum(-1))


def w2_gaussian(m1, S1, m2, S2) -> np.ndarray:
    """W2 between N(m1, S1) and N(m2, S2), batched over leading axes:
    sqrt(||m1 − m2||² + Tr(S1 + S2 − 2 (S2^{1/2} S1 S2^{1/2})^{1/2}))."""
    S1, S2 = np.asarray(S1, dtype=np.float64), np.asarray(S2, dtype=np.float64)
    vals, vecs = np.linalg.eigh(S2)
    root = (vecs * np.sqrt(np.clip(vals, 0, None))[..., None, :]) @ vecs.swapaxes(-1, -2)
    cross = np.linalg.eigvalsh(root @ S1 @ root)
    tr = np.trace(S1, axis1=-2, axis2=-1) + np.trace(S2, axis1=-2, axis2=-1) \
        - 2 * np.sqrt(np.clip(cross, 0, None)).sum(-1)
    sq = ((np.asarray(m1) - m2) ** 2).sum(-1) + tr
    return np.sqrt(np.clip(sq, 0, None))


def affine_output_w2(a, b, mean, var, prior: str, sigma_min: float = SIGMA_MIN,
                     sigma_max: float = SIGMA_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Exact (W2 to the data law N(μ, diag(s²)), W2 to p_{σ_min}) of the diagonal affine sampler x ↦ a x + b
    applied to the ``prior`` input; a, b [..., d]."""
    var = np.asarray(var, dtype=np.float64)
    m_out, sd_out = affine_output_diag(a, b, *prior_law(prior, mean, var, sigma_max))
    return (w2_diag(m_out, sd_out, mean, np.sqrt(var)),
            w2_diag(m_out, sd_out, mean, np.sqrt(var + sigma_min ** 2)))


def affine_output_w2_full(A, b, mean, var, prior: str, sigma_min: float = SIGMA_MIN,
                          sigma_max: float = SIGMA_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Full-matrix version of ``affine_output_w2``: output N(A m_in + b, A V_in Aᵀ); A [..., d, d]."""
    var = np.asarray(var, dtype=np.float64)
    m_in, v_in = prior_law(prior, mean, var, sigma_max)
    m_out = (A @ m_in) + b
    cov_out = (A * v_in[None, :]) @ A.swapaxes(-1, -2)
    return (w2_gaussian(m_out, cov_out, mean, np.diag(var)),
            w2_gaussian(m_out, cov_out, mean, np.diag(var + sigma_min ** 2)))


# ----------------------------------------------------------------------------------------------------
# Rates
# ----------------------------------------------------------------------------------------------------
def loglog_slope(x, y) -> tuple[float, float]:
    """Least-squares line log y = k log x + c over the points with finite positive x, y; returns (k, c)
    (nan, nan with fewer than two such points)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    if ok.sum() < 2:
        return float("nan"), float("nan")
    k, c = np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)
    return float(k), float(c)


def n_for_eps(ns, err, eps: float) -> float:
    """Smallest N reaching err ≤ eps: the first grid crossing, interpolated linearly in log-log between the
    last grid point above eps and the first at or below it. ns[0] if the first point already qualifies (a
    ceiling: the true N_ε may be smaller); inf if never reached."""
    ns, err = np.asarray(ns, dtype=np.float64), np.asarray(err, dtype=np.float64)
    hit = np.flatnonzero(err <= eps)
    if not len(hit):
        return float("inf")
    k = hit[0]
    if k == 0:
        return float(ns[0])
    x0, x1, y0, y1 = np.log(ns[k - 1]), np.log(ns[k]), np.log(err[k - 1]), np.log(max(err[k], 1e-300))
    return float(np.exp(x0 + (np.log(eps) - y0) * (x1 - x0) / (y1 - y0)))
