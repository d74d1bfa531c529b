"""Theory study: how many consistency-training steps N a *perfect* CT learner needs on Gaussian data.

Li, Huang & Wei (2024) (papers.md §7) bound the Wasserstein error of consistency training by order
d^{5/2} log^5 T / T + ε + ε_F, i.e. T ≳ d^{5/2}/ε steps. This study measures the error of CT itself in a
setting where everything is closed form (numpy/scipy/pandas only, no torch):

* data x0 ~ N(μ, diag(s²)) in d dimensions, VE/EDM noising x_σ = x0 + σ z (papers.md §8.1);
* Karras grid σ_1 = σ_min < ... < σ_N = σ_max (ρ = 7; cmbench.grids.karras_sigmas);
* model class: (diagonal or full) affine maps f_i(x) = A_i x + b_i, one per grid point, with the CM
  boundary condition f_1 = identity. The class contains the exact consistency map
  f*(x, σ) = μ + (x − μ)·sqrt((s² + σ_min²)/(s² + σ²)) (covariance diagonal ⇒ the map is diagonal), so
  the approximation error ε_F is zero;
* CT step for the pair (σ_i, σ_{i+1}) (papers.md §2.3): regress the target f_i(x0 + σ_i z) on the input
  x0 + σ_{i+1} z (same z) by least squares. With the population moments of (x0, z) this is what CT with
  an ℓ2 loss converges to with infinite data and a perfect optimiser (``method = population``: pure
  discretisation error). Fitted on n fresh samples per step it adds estimation error
  (``method = sampled``).

The sampler's output f_N(x_{σ_max}) is Gaussian, so its W2 to the data law is exact (papers.md §8.4).
Two inputs (``prior``): ``true`` draws x_{σ_max} from p_{σ_max} = N(μ, diag(s² + σ_max²)) (isolates the
CT error); ``sampler`` draws it from N(0, σ_max² I) as real samplers do (adds the §8.1 prior-mismatch
floor, reported as ``w2_floor``: the exact map's W2 from the same input).

Per (case, model, method, prior, d, N, seed) the tidy table holds
``w2``      W2 to the data law N(μ, diag(s²)) (X_0 in the paper's notation);
``w2_floor``  the same for the exact map f*(·, σ_max) from the same input;
``w2_excess`` w2 − w2_floor;
``w2_x1``   W2 to p_{σ_min} = N(μ, diag(s² + σ_min²)), the law the exact consistency map targets (X_1);
``w2_x1_floor`` the exact map's w2_x1 (0 up to rounding for the true input).
The error that slopes and N_ε are computed from (``err``) is w2_x1 for the true input and w2_excess for
the sampler input: in both cases the distance from what the exact consistency map achieves.

Run: ``python -m cmbench.studies.theory OUT_DIR``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd

from cmbench.grids import karras_sigmas

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
DIMS = (1, 2, 4, 8, 16, 32, 64)
NS = tuple(2 ** k for k in range(2, 13))          # 4 ... 4096
CASES = ("isotropic", "loguniform")
PRIORS = ("true", "sampler")
BOUND_D_EXPONENT = 2.5                            # T ≳ d^{5/2}/ε (papers.md §7)
DETERMINISTIC_SEED = -1                           # seed column of the rows that use no randomness
# Default largest d for the sampled full d × d fits: d = 64 would cost ~12 of ~21 CPU seconds (O(d³) per
# step) and, at n = 2000, does not reach ε = 0.01 within N ≤ 4096. Pass full_dims to override.
FULL_MAX_DIM = 32


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


# ----------------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------------
def _single_threaded_blas():
    """Limit BLAS to one thread while the study runs: its matrices are at most 2d × 2d = 128 × 128, where a
    multi-threaded OpenBLAS is slower (measured 0.64 vs 0.08 ms per 128 × 128 product on 2 busy cores).
    threadpoolctl is optional (a scikit-learn dependency); without it this is a no-op."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _write_atomic(path: Path, write) -> Path:
    """Call write(tmp_path) then move tmp into place (os.replace), so readers never see a partial file."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def _rows_diag(groups, mean, var, a, b, *, model, method, seeds, N, sigma_min, sigma_max, delta=0.0):
    """Tidy rows for diagonal-affine maps a, b [S, K] on the concatenated coordinates of ``groups``."""
    offsets = [g[2].start for g in groups]
    a_star, b_star = exact_map(mean, var, sigma_max, sigma_min)
    rows = []
    for prior in PRIORS:
        m_in, v_in = prior_law(prior, mean, var, sigma_max)
        targets = (np.sqrt(var), np.sqrt(var + sigma_min ** 2))

        def sq_terms(aa, bb):
            m_out, sd_out = affine_output_diag(aa, bb, m_in, v_in)
            return [np.add.reduceat((m_out - mean) ** 2 + (sd_out - t) ** 2, offsets, axis=-1)
                    for t in targets]

        floor, floor_x1 = (np.sqrt(v) for v in sq_terms(a_star, b_star))
        w2, w2_x1 = (np.sqrt(v) for v in sq_terms(a, b))
        for si, seed in enumerate(seeds):
            for gi, (case, d, _) in enumerate(groups):
                rows.append(dict(case=case, model=model, method=method, prior=prior, d=d, N=N, seed=seed,
                                 delta=delta, w2=w2[si, gi], w2_floor=floor[gi],
                                 w2_excess=w2[si, gi] - floor[gi], w2_x1=w2_x1[si, gi],
                                 w2_x1_floor=floor_x1[gi]))
    return rows


def _rows_full(case, d, mean, var, A, b, *, seeds, N, sigma_min, sigma_max):
    a_star, b_star = exact_map(mean, var, sigma_max, sigma_min)
    rows = []
    for prior in PRIORS:
        floor, floor_x1 = affine_output_w2(a_star, b_star, mean, var, prior, sigma_min, sigma_max)
        w2, w2_x1 = affine_output_w2_full(A, b, mean, var, prior, sigma_min, sigma_max)
        for si, seed in enumerate(seeds):
            rows.append(dict(case=case, model="full", method="sampled", prior=prior, d=d, N=N, seed=seed,
                             delta=0.0, w2=w2[si], w2_floor=float(floor), w2_excess=w2[si] - float(floor),
                             w2_x1=w2_x1[si], w2_x1_floor=float(floor_x1)))
    return rows


def compute_theory_table(dims=DIMS, ns=NS, n_samples: int = 2000, seeds=(0, 1, 2), cases=CASES,
                         mu: float = 0.3, s: float = 0.5, s_lo: float = 0.05, s_hi: float = 2.0,
                         sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
                         full_cases=("loguniform",), full_dims=None, total_deltas=(-0.01, 0.01),
                         step_deltas=(-1e-5, -1e-4)) -> pd.DataFrame:
    """All rows of theory.csv (see the module docstring for the columns).

    method: ``population`` (exact regression), ``sampled`` (n_samples fresh samples per step; model
    ``diagonal`` for every case, ``full`` d × d maps for ``full_cases`` and ``full_dims``, by default the
    dims ≤ FULL_MAX_DIM),
    ``perturbed-total`` (population, every slope × (1 + δ)^{1/(N−1)}: the terminal map carries a relative
    error δ whatever N) and ``perturbed-step`` (population, every slope × (1 + δ): a per-step error that
    does not shrink with the step size). Deterministic rows have seed −1."""
    dims, ns, seeds = [int(d) for d in dims], [int(n) for n in ns], [int(x) for x in seeds]
    full_dims = [d for d in dims if d <= FULL_MAX_DIM] if full_dims is None else [int(d) for d in full_dims]
    groups, means, stds, start = [], [], [], 0
    for case in cases:
        for d in dims:
            mean_d, std_d = data_params(d, case, mu, s, s_lo, s_hi)
            groups.append((case, d, slice(start, start + d)))
            means.append(mean_d)
            stds.append(std_d)
            start += d
    mean, std = np.concatenate(means), np.concatenate(stds)
    var = std ** 2
    kw = dict(sigma_min=sigma_min, sigma_max=sigma_max)
    det = [DETERMINISTIC_SEED]
    rows = []
    for N in ns:
        sig = karras_grid(N, sigma_min, sigma_max, rho)
        a, b = population_recursion(mean, var, sig)
        rows += _rows_diag(groups, mean, var, a[None], b[None], model="diagonal", method="population",
                           seeds=det, N=N, **kw)
        for delta in total_deltas:
            a, b = population_recursion(mean, var, sig, (1 + delta) ** (1 / (N - 1)))
            rows += _rows_diag(groups, mean, var, a[None], b[None], model="diagonal",
                               method="perturbed-total", seeds=det, N=N, delta=delta, **kw)
        for delta in step_deltas:
            a, b = population_recursion(mean, var, sig, 1 + delta)
            rows += _rows_diag(groups, mean, var, a[None], b[None], model="diagonal",
                               method="perturbed-step", seeds=det, N=N, delta=delta, **kw)
        if seeds and n_samples:
            rngs = [np.random.default_rng([seed, N, 0]) for seed in seeds]
            a, b = sampled_recursion_diag(rngs, mean, std, sig, n_samples)
            rows += _rows_diag(groups, mean, var, a, b, model="diagonal", method="sampled", seeds=seeds,
                               N=N, **kw)
            for ci, case in enumerate(cases):
                if case not in full_cases:
                    continue
                for d in full_dims:
                    mean_d, std_d = data_params(d, case, mu, s, s_lo, s_hi)
                    rngs = [np.random.default_rng([seed, N, 1, ci, d]) for seed in seeds]
                    A, b = sampled_recursion_full(rngs, mean_d, std_d, sig, n_samples)
                    rows += _rows_full(case, d, mean_d, std_d ** 2, A, b, seeds=seeds, N=N, **kw)
    df = pd.DataFrame(rows)
    df["err"] = np.where(df["prior"] == "true", df["w2_x1"], df["w2_excess"])
    return df


def _series_name(case, model, method, prior) -> str:
    return f"{case} · {method}" + (f" ({model})" if method == "sampled" else "") + f" · {prior} prior"


def rate_tables(df: pd.DataFrame, eps: float, fit_min_n: int = 64, terminal_points: int = 3):
    """Per series (case, model, method, prior) and d: the log-log slope of the seed-mean error vs N over
    N ≥ fit_min_n, the terminal slope over the last ``terminal_points`` grid values of N, and N_ε; plus per
    series the log-log slope of N_ε vs d over the d whose N_ε lies strictly inside the grid (all of them, and
    the last ``terminal_points`` of them)."""
    main = df[df["method"].isin(["population", "sampled"])]
    curves = main.groupby(["case", "model", "method", "prior", "d", "N"], sort=True)["err"].mean()
    rows = []
    for (case, model, method, prior, d), c in curves.groupby(level=[0, 1, 2, 3, 4], sort=True):
        N = c.index.get_level_values("N").to_numpy(dtype=float)
        e = c.to_numpy()
        fit = N >= fit_min_n
        rows.append(dict(case=case, model=model, method=method, prior=prior, d=d,
                         series=_series_name(case, model, method, prior),
                         slope=loglog_slope(N[fit], e[fit])[0],
                         slope_terminal=loglog_slope(N[-terminal_points:], e[-terminal_points:])[0],
                         n_eps=n_for_eps(N, e, eps), n_min=N.min(), n_max=N.max(),
                         err_at_n_max=e[-1]))
    per_d = pd.DataFrame(rows)
    per_series = []
    for name, g in per_d.groupby("series", sort=False):
        inside = g[(g["n_eps"] > g["n_min"]) & np.isfinite(g["n_eps"])]
        per_series.append(dict(series=name, case=g["case"].iloc[0], method=g["method"].iloc[0],
                               model=g["model"].iloc[0], prior=g["prior"].iloc[0],
                               n_eps_d_slope=loglog_slope(inside["d"], inside["n_eps"])[0],
                               n_eps_d_slope_terminal=loglog_slope(inside["d"].iloc[-terminal_points:],
                                                                   inside["n_eps"].iloc[-terminal_points:])[0],
                               n_eps_d_points=len(inside), bound_d_exponent=BOUND_D_EXPONENT))
    return per_d, pd.DataFrame(per_series)


def additivity_table(df: pd.DataFrame, data_kw: dict | None = None,
                     sigma_min: float = SIGMA_MIN) -> pd.DataFrame:
    """For the ``perturbed-total`` rows (true prior): err(N, δ) / (err(N, 0) + err(∞, δ)), where err(∞, δ) is
    the error of the exact map with its slope × (1 + δ) (= |δ|·sqrt(Σ_j (s_j² + σ_min²)) vs p_{σ_min}).
    1 means the discretisation and the injected error add; < 1 that they partly cancel."""
    base = df[(df["method"] == "population") & (df["prior"] == "true")].set_index(["case", "d", "N"])["err"]
    pert = df[(df["method"] == "perturbed-total") & (df["prior"] == "true")]
    out = []
    for (case, d, delta), g in pert.groupby(["case", "d", "delta"]):
        _, std = data_params(int(d), case, **(data_kw or {}))
        alone = abs(delta) * np.sqrt((std ** 2 + sigma_min ** 2).sum())
        ratio = g["err"].to_numpy() / (base.loc[[(case, d, n) for n in g["N"]]].to_numpy() + alone)
        out.append(dict(case=case, d=d, delta=delta, ratio_min=ratio.min(), ratio_max=ratio.max()))
    return pd.DataFrame(out)


def _fmt(v, kind="g") -> str:
    if isinstance(v, (float, np.floating)) and np.isnan(v):
        return "n/a"
    if kind == "slope":
        return f"{v:+.3f}"
    return f"{v:.4g}"


def _fmt_neps(v, n_min, n_max) -> str:
    if not np.isfinite(v):
        return f"not reached (> {n_max:g})"
    if v <= n_min:
        return f"≤ {n_min:g}"
    return f"{v:.0f}"


def _pivot(per_d: pd.DataFrame, value: str, fmt) -> pd.DataFrame:
    order = list(dict.fromkeys(per_d["series"]))
    tab = per_d.pivot(index="series", columns="d", values=value).reindex(order)
    out = pd.DataFrame(index=tab.index)
    rows = per_d.set_index(["series", "d"])
    for d in tab.columns:            # "not run": e.g. the full fits skip d > FULL_MAX_DIM by default
        out[f"d={d}"] = [fmt(v, rows.loc[(s, d)]) if (s, d) in rows.index else "not run"
                         for s, v in tab[d].items()]
    return out


def _range(v: pd.Series, fmt: str = "+.2f") -> str:
    lo, hi = format(v.min(), fmt), format(v.max(), fmt)
    return lo if lo == hi else f"{lo} to {hi}"


def _findings(df, per_d, per_series, add, eps, n_samples, fit_min_n, step_opt) -> str:
    """One sentence of findings, every number taken from the results."""
    pop = per_d[(per_d["method"] == "population") & (per_d["prior"] == "true")]
    ser = per_series.set_index(["case", "method", "model", "prior"])
    parts = [f"Population CT (exact least-squares steps, zero approximation error) has a W2 error to p_σmin "
             f"(true prior) falling as N^k with k = {_range(pop['slope'])} (N ≥ {fit_min_n}, every d and "
             f"spectrum)"]
    q = [f"d^{ser.loc[key, 'n_eps_d_slope']:.2f} ({key[0]}; last three d: "
         f"d^{ser.loc[key, 'n_eps_d_slope_terminal']:.2f})"
         for key in [(c, "population", "diagonal", "true") for c in pop["case"].unique()] if key in ser.index]
    if q:
        parts.append(f"so N_ε (ε = {eps:g}) grows as {' and '.join(q)}, far below the d^{BOUND_D_EXPONENT:g}/ε "
                     f"order of the bound")
    smp = per_d[(per_d["method"] == "population") & (per_d["prior"] == "sampler")]
    floor = df[(df["method"] == "population") & (df["prior"] == "sampler")]
    if len(smp):
        per_dim = (floor["w2_floor"] / np.sqrt(floor["d"])).agg(["min", "max"])
        parts.append(f"from the sampler's N(0, σ_max² I) input the exact map's own floor (W2/√d = "
                     f"{_range(per_dim, '.2g')}) adds in quadrature, so the excess over it falls faster "
                     f"(terminal slope {_range(smp['slope_terminal'])})")
    samp = per_d[(per_d["method"] == "sampled") & (per_d["model"] == "diagonal") & (per_d["prior"] == "true")]
    if len(samp):
        t = samp["slope_terminal"].median()
        trend = "still decays" if t < -0.2 else ("plateaus" if t <= 0.2 else "grows")
        parts.append(f"fitting each step on n = {n_samples} fresh samples adds an error that {trend} with N "
                     f"(median terminal slope {t:+.2f}) rather than accumulating")
        grow = [f"d^{r['n_eps_d_slope']:.2f} ({mo}, {c}; last three d: d^{r['n_eps_d_slope_terminal']:.2f})"
                for (c, m, mo, p), r in ser.iterrows() if m == "sampled" and p == "true"]
        if grow:
            parts.append("N_ε of the sampled fits grows as " + ", ".join(grow))
    neg = add[add["delta"] < 0] if len(add) else add
    if len(neg):
        parts.append(f"an injected terminal slope error δ < 0 adds to the discretisation error (ratio "
                     f"{neg['ratio_min'].min():.3f}–{neg['ratio_max'].max():.3f})")
    if len(step_opt):
        parts.append("a per-step error that does not shrink with the step size accumulates instead, giving an "
                     "optimal N (" + "; ".join(f"δ = {r.delta:g}: N* = {r.n_best:g}"
                                              for r in step_opt.itertuples()) + ")")
    return "; ".join(parts) + "."


def _per_step_optimum(df: pd.DataFrame) -> pd.DataFrame:
    """N minimising the error for each per-step perturbation δ (log-uniform spectrum, largest d, or the
    first case present)."""
    p = df[(df["method"] == "perturbed-step") & (df["prior"] == "true")]
    if not len(p):
        return pd.DataFrame(columns=["case", "d", "delta", "n_best", "err_best"])
    case = "loguniform" if "loguniform" in set(p["case"]) else p["case"].iloc[0]
    p = p[(p["case"] == case) & (p["d"] == p["d"].max())]
    best = p.loc[p.groupby("delta")["err"].idxmin()]
    return pd.DataFrame(dict(case=case, d=best["d"], delta=best["delta"], n_best=best["N"],
                             err_best=best["err"])).reset_index(drop=True)


def _md(tab: pd.DataFrame) -> str:
    """Markdown table with the cells exactly as formatted (no re-parsing of numbers by tabulate)."""
    return tab.to_markdown(disable_numparse=True)


def _tex_escape(s: str) -> str:
    for a, b in [("\\", r"\textbackslash{}"), ("^", r"\textasciicircum{}"), ("&", r"\&"), ("%", r"\%"),
                 ("_", r"\_"), ("#", r"\#"),
                 ("≤", r"$\le$"), ("≥", r"$\ge$"), (">", r"$>$"), ("·", r"$\cdot$"), ("ε", r"$\varepsilon$"),
                 ("σ", r"$\sigma$"), ("δ", r"$\delta$"), ("×", r"$\times$"), ("–", "--")]:
        s = s.replace(a, b)
    return s


def _tex_table(tab: pd.DataFrame, caption: str) -> str:
    cols = [tab.index.name or "series", *tab.columns]
    lines = [r"\begin{table}[ht]", r"\centering\small", r"\begin{tabular}{l" + "r" * len(tab.columns) + "}",
             r"\hline", " & ".join(_tex_escape(str(c)) for c in cols) + r" \\", r"\hline"]
    for idx, row in tab.iterrows():
        lines.append(" & ".join(_tex_escape(str(v)) for v in [idx, *row]) + r" \\")
    lines += [r"\hline", r"\end{tabular}", rf"\caption{{{_tex_escape(caption)}}}", r"\end{table}", ""]
    return "\n".join(lines)


def _plot(df, per_d, path: Path, eps: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    main = df[df["method"].isin(["population", "sampled"]) & (df["prior"] == "true")].copy()
    main["fit"] = np.where(main["method"] == "population", "population",
                           "sampled (" + main["model"] + ")")
    cases = list(dict.fromkeys(main["case"]))
    fig, axes = plt.subplots(1, len(cases) + 1, figsize=(5.2 * (len(cases) + 1), 4.4))
    palette = sns.color_palette("viridis", main["d"].nunique())
    for ax, case in zip(axes, cases):
        sub = main[main["case"] == case]
        sns.lineplot(sub, x="N", y="err", hue="d", style="fit", palette=palette, marker="o",
                     markersize=3, errorbar=None, ax=ax)
        ax.axhline(eps, color="grey", lw=0.8, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="CT steps N",
               ylabel=r"W2 to $p_{\sigma_{min}}$ (true prior)", title=f"{case} spectrum")
        ax.legend(fontsize=6, ncol=2, loc="lower left")
    ax = axes[-1]
    ok = per_d[np.isfinite(per_d["n_eps"]) & (per_d["n_eps"] > per_d["n_min"])
               & (per_d["prior"] == "true")].copy()
    ok["fit"] = ok["case"] + " · " + np.where(ok["method"] == "population", "population",
                                              "sampled (" + ok["model"] + ")")
    if len(ok):
        sns.lineplot(ok, x="d", y="n_eps", hue="fit", marker="o", ax=ax)
        d = np.array(sorted(ok["d"].unique()), dtype=float)
        ref = ok[ok["method"] == "population"].sort_values("d")
        anchor_d, anchor_n = (ref["d"].iloc[0], ref["n_eps"].iloc[0]) if len(ref) else (d[0], ok["n_eps"].min())
        ax.plot(d, anchor_n * (d / anchor_d) ** BOUND_D_EXPONENT, "k--", lw=1, label=r"$\propto d^{5/2}$ (bound)")
        ax.plot(d, anchor_n * (d / anchor_d) ** 0.5, "k:", lw=1, label=r"$\propto d^{1/2}$")
        ax.legend(fontsize=6)
    ax.set(xscale="log", yscale="log", xlabel="d", ylabel=rf"$N_\varepsilon$ ($\varepsilon$ = {eps:g})",
           title=r"steps to reach W2 $\leq \varepsilon$ (true prior)")
    fig.tight_layout()
    _write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def run_theory_study(out_dir: Path, dims=DIMS, ns=NS, eps: float = 0.01, n_samples: int = 2000,
                     seeds=(0, 1, 2), cases=CASES, mu: float = 0.3, s: float = 0.5, s_lo: float = 0.05,
                     s_hi: float = 2.0, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                     rho: float = RHO, fit_min_n: int = 64, full_cases=("loguniform",), full_dims=None,
                     total_deltas=(-0.01, 0.01), step_deltas=(-1e-5, -1e-4), plot: bool = True) -> list[Path]:
    """Run the study and write theory.csv, theory_slopes.csv, theory_summary.md, theory_summary.tex and
    (``plot``) theory.png into out_dir, each atomically. Returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _single_threaded_blas():
        df = compute_theory_table(dims, ns, n_samples, seeds, cases, mu, s, s_lo, s_hi, sigma_min,
                                  sigma_max, rho, full_cases, full_dims, total_deltas, step_deltas)
    per_d, per_series = rate_tables(df, eps, fit_min_n)
    add = additivity_table(df, dict(mu=mu, s=s, s_lo=s_lo, s_hi=s_hi), sigma_min)
    step_opt = _per_step_optimum(df)

    slopes = per_d.merge(per_series[["series", "n_eps_d_slope", "n_eps_d_slope_terminal", "n_eps_d_points",
                                     "bound_d_exponent"]],
                         on="series")
    slopes.insert(0, "eps", eps)
    paths = [_write_atomic(out_dir / "theory.csv", lambda t: df.to_csv(t, index=False)),
             _write_atomic(out_dir / "theory_slopes.csv", lambda t: slopes.to_csv(t, index=False))]

    slope_tab = _pivot(per_d, "slope", lambda v, r: _fmt(v, "slope"))
    term_tab = _pivot(per_d, "slope_terminal", lambda v, r: _fmt(v, "slope"))
    neps_tab = _pivot(per_d, "n_eps", lambda v, r: _fmt_neps(v, r["n_min"], r["n_max"]))
    ps = per_series.set_index("series")
    neps_tab["slope vs d"] = [_fmt(ps.loc[i, "n_eps_d_slope"], "slope") for i in neps_tab.index]
    neps_tab["slope, last 3 d"] = [_fmt(ps.loc[i, "n_eps_d_slope_terminal"], "slope") for i in neps_tab.index]
    neps_tab["bound order"] = f"d^{BOUND_D_EXPONENT:g}/ε"
    for t in (slope_tab, term_tab, neps_tab):
        t.index.name = "series"
    add_tab = None
    if len(add):
        add = add.sort_values(["case", "d", "delta"])
        add_tab = (add.assign(case_d=lambda x: x["case"] + " · d=" + x["d"].astype(str))
                   .pivot(index="case_d", columns="delta", values=["ratio_min", "ratio_max"])
                   .reindex(list(dict.fromkeys(add["case"] + " · d=" + add["d"].astype(str)))))
        add_tab = add_tab[[(c, dl) for dl in sorted(add["delta"].unique()) for c in ("ratio_min", "ratio_max")]]
        add_tab.columns = [f"{'min' if c == 'ratio_min' else 'max'} ratio, δ={dl:g}" for c, dl in add_tab.columns]
        add_tab = add_tab.map(lambda v: f"{v:.4f}")
        add_tab.index.name = "case · d"
    step_tab = step_opt.assign(delta=lambda x: x["delta"].map(lambda v: f"{v:g}"),
                               n_best=lambda x: x["n_best"].map(lambda v: f"{v:g}"),
                               err_best=lambda x: x["err_best"].map(lambda v: f"{v:.3g}")).set_index("case")
    if len(step_tab):
        step_tab.index.name = "case"
    findings = _findings(df, per_d, per_series, add, eps, n_samples, fit_min_n, step_opt)

    setup = (f"Data N(μ·1, diag(s²)), μ = {mu:g}; spectra: isotropic s = {s:g}, log-uniform s ∈ [{s_lo:g}, {s_hi:g}] "
             f"(mid-quantiles). Karras grid σ ∈ [{sigma_min:g}, {sigma_max:g}], ρ = {rho:g}, N ∈ {list(ns)}; "
             f"d ∈ {list(dims)}. Affine CT recursion from f_1 = id; `population` = exact least-squares "
             f"regressions (what CT with an ℓ2 loss converges to with infinite data and a perfect optimiser: "
             f"pure discretisation error), `sampled` = each step fitted on n = {n_samples} fresh samples "
             f"(seeds {list(seeds)}, mean W2 over seeds). Error = W2 to p_σmin for the true prior "
             f"N(μ, s² + σ_max²) (0 for the exact map), and W2 to the data minus the exact map's floor for the "
             f"sampler prior N(0, σ_max²). Slopes fitted on N ≥ {fit_min_n}; terminal slope on the last 3 N.")
    mechanism = ("Mechanism (closed form): each population step multiplies the slope by (s² + σ_i σ_{i+1})/(s² + "
                 "σ_{i+1}²) and keeps b = μ(1 − a) exact, so a_N/a* = Π_i (s² + σ_i σ_{i+1})/sqrt((s² + σ_i²)"
                 "(s² + σ_{i+1}²)) ≤ 1 (Cauchy–Schwarz): the CT fixed point under-disperses, by a relative "
                 "amount Σ_i s²(σ_{i+1} − σ_i)²/(2(s² + σ²)²) = O(1/N) per coordinate. With n samples per step "
                 "the slope noise has variance s²(σ_{i+1} − σ_i)²/(n(s² + σ²)²) per step, i.e. O(1/(nN)) in "
                 "total, so estimation error does not accumulate over steps.")
    bound = ("The bound (papers.md §7, Li, Huang & Wei 2024) is on W1 for a DDPM-type chain, with Lipschitz "
             "constants and log factors; a smaller d-exponent here is not a contradiction. With Gaussian data "
             "and an affine model every coordinate (eigen-direction) carries its own O(1/N) discretisation "
             "error, so W2 grows like sqrt(d) for a fixed per-coordinate spectrum; the sampled rows add the "
             "d-dependence of estimation (d + 1 regressors per output for full maps).")
    md = ["# Theory study: CT steps needed on Gaussian data", "", setup, "", f"**Findings.** {findings}", "",
          mechanism, "", bound, "", f"## Log-log slope of the error vs N (N ≥ {fit_min_n})", "",
          _md(slope_tab), "", "## Terminal slope (last 3 grid values of N)", "", _md(term_tab), "",
          f"## N_ε for ε = {eps:g} and its log-log slope vs d", "", _md(neps_tab), ""]
    tex = [f"% Theory study (cmbench.studies.theory). {_tex_escape(setup)}", "",
           f"% Findings: {_tex_escape(findings)}", "", f"% {_tex_escape(mechanism)}", "",
           _tex_table(slope_tab, f"Log-log slope of the W2 error vs N (N ≥ {fit_min_n})."),
           _tex_table(term_tab, "Terminal log-log slope (last 3 grid values of N)."),
           _tex_table(neps_tab, f"N_ε for ε = {eps:g} and its log-log slope vs d.")]
    if add_tab is not None:
        md += ["## Additivity of an injected terminal error", "",
               "err(N, δ) / (err(N, 0) + err(∞, δ)), min and max over N; every fitted slope × (1 + δ)^{1/(N−1)} "
               "so the terminal map carries a relative slope error δ. 1 = the two errors add.", "",
               _md(add_tab), ""]
        tex.append(_tex_table(add_tab, "Additivity ratio of an injected terminal error."))
    if len(step_tab):
        md += ["## Per-step error that does not shrink with the step size", "",
               "Every fitted slope × (1 + δ): the error accumulates over the N steps, so there is an optimal N.",
               "", _md(step_tab), ""]
        tex.append(_tex_table(step_tab, "Optimal N under a per-step slope error δ."))
    paths.append(_write_atomic(out_dir / "theory_summary.md", lambda t: t.write_text("\n".join(md))))
    paths.append(_write_atomic(out_dir / "theory_summary.tex", lambda t: t.write_text("\n".join(tex))))
    if plot:
        _plot(df, per_d, out_dir / "theory.png", eps)
        paths.append(out_dir / "theory.png")
    return paths


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path("results/theory")
    t0 = time.perf_counter()
    for p in run_theory_study(out):
        print(p)
    print(f"theory study: {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
