"""The study's tables: the CT recursions of `model` run over every spectrum, d, N, method and prior (theory.csv),
and the rates, N_ε, additivity and per-step optimum read off them."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cmbench.studies.theory.model import (CASES, PRIORS, RHO, SIGMA_MAX, SIGMA_MIN, affine_output_diag,
                                          affine_output_w2, affine_output_w2_full, data_params, exact_map,
                                          karras_grid, loglog_slope, n_for_eps, population_recursion, prior_law,
                                          sampled_recursion_diag, sampled_recursion_full)

DIMS = (1, 2, 4, 8, 16, 32, 64)
NS = tuple(2 ** k for k in range(2, 13))          # 4 ... 4096
BOUND_D_EXPONENT = 2.5                            # T ≳ d^{5/2}/ε (papers.md §7)
DETERMINISTIC_SEED = -1                           # seed column of the rows that use no randomness
# Default largest d for the sampled full d × d fits: d = 64 would cost ~12 of ~21 CPU seconds (O(d³) per
# step) and, at n = 2000, does not reach ε = 0.01 within N ≤ 4096. Set StudySettings.full_dims to override.
FULL_MAX_DIM = 32


@dataclass(frozen=True)
class StudySettings:
    """What the study varies; the defaults are the study the workflow runs."""
    dims: tuple[int, ...] = DIMS
    ns: tuple[int, ...] = NS                      # grid sizes N
    cases: tuple[str, ...] = CASES                # data spectra (model.data_params) ...
    mu: float = 0.3                               # ... of N(μ·1, diag(s²))
    s: float = 0.5
    s_lo: float = 0.05
    s_hi: float = 2.0
    sigma_min: float = SIGMA_MIN                  # the Karras grid
    sigma_max: float = SIGMA_MAX
    rho: float = RHO
    n_samples: int = 2000                         # fresh samples per step of the sampled fits
    seeds: tuple[int, ...] = (0, 1, 2)            # of the sampled fits
    full_cases: tuple[str, ...] = ("loguniform",)  # spectra with sampled full d × d fits, at full_dims
    full_dims: tuple[int, ...] | None = None      # None: the dims ≤ FULL_MAX_DIM
    total_deltas: tuple[float, ...] = (-0.01, 0.01)  # injected terminal slope errors (perturbed-total)
    step_deltas: tuple[float, ...] = (-1e-5, -1e-4)  # per-step slope errors (perturbed-step)
    eps: float = 0.01                             # the error N_ε reaches
    fit_min_n: int = 64                           # slopes fitted on N ≥ fit_min_n
    plot: bool = True                             # write theory.png

    def __post_init__(self):
        """Plain ints (they seed the generators and fill the d, N and seed columns)."""
        for name in ("dims", "ns", "seeds", "full_dims"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))

    def data(self, d: int, case: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-coordinate mean and std of the data law (model.data_params)."""
        return data_params(d, case, self.mu, self.s, self.s_lo, self.s_hi)


def single_threaded_blas():
    """Limit BLAS to one thread while the study runs: its matrices are at most 2d × 2d = 128 × 128, where a
    multi-threaded OpenBLAS is slower (measured 0.64 vs 0.08 ms per 128 × 128 product on 2 busy cores).
    threadpoolctl is optional (a scikit-learn dependency); without it this is a no-op."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


# ----------------------------------------------------------------------------------------------------
# theory.csv
# ----------------------------------------------------------------------------------------------------
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


def _coordinates(st: StudySettings):
    """Every (case, d) of the study side by side as one diagonal law, so that each diagonal recursion runs once
    per N for all of them: groups [(case, d, slice of its coordinates)], and the per-coordinate mean and std."""
    groups, means, stds, start = [], [], [], 0
    for case in st.cases:
        for d in st.dims:
            mean_d, std_d = st.data(d, case)
            groups.append((case, d, slice(start, start + d)))
            means.append(mean_d)
            stds.append(std_d)
            start += d
    return groups, np.concatenate(means), np.concatenate(stds)


def _population_rows(st: StudySettings, groups, mean, var, N: int, sig) -> list[dict]:
    """The deterministic rows at N: exact regressions, then each injected slope error."""
    runs = ([("population", 0.0, 1.0)]
            + [("perturbed-total", delta, (1 + delta) ** (1 / (N - 1))) for delta in st.total_deltas]
            + [("perturbed-step", delta, 1 + delta) for delta in st.step_deltas])
    rows = []
    for method, delta, slope_factor in runs:
        a, b = population_recursion(mean, var, sig, slope_factor)
        rows += _rows_diag(groups, mean, var, a[None], b[None], model="diagonal", method=method,
                           seeds=[DETERMINISTIC_SEED], N=N, delta=delta, sigma_min=st.sigma_min,
                           sigma_max=st.sigma_max)
    return rows


def _sampled_rows(st: StudySettings, groups, mean, std, N: int, sig) -> list[dict]:
    """The rows of the fits on n_samples fresh samples per step: diagonal maps for every case, full d × d maps
    for full_cases at full_dims. Each (seed, N[, case, d]) has its own generator."""
    kw = dict(seeds=st.seeds, N=N, sigma_min=st.sigma_min, sigma_max=st.sigma_max)
    rngs = [np.random.default_rng([seed, N, 0]) for seed in st.seeds]
    a, b = sampled_recursion_diag(rngs, mean, std, sig, st.n_samples)
    rows = _rows_diag(groups, mean, std ** 2, a, b, model="diagonal", method="sampled", **kw)
    full_dims = [d for d in st.dims if d <= FULL_MAX_DIM] if st.full_dims is None else st.full_dims
    for ci, case in enumerate(st.cases):
        if case not in st.full_cases:
            continue
        for d in full_dims:
            mean_d, std_d = st.data(d, case)
            rngs = [np.random.default_rng([seed, N, 1, ci, d]) for seed in st.seeds]
            A, b = sampled_recursion_full(rngs, mean_d, std_d, sig, st.n_samples)
            rows += _rows_full(case, d, mean_d, std_d ** 2, A, b, **kw)
    return rows


def compute_theory_table(st: StudySettings) -> pd.DataFrame:
    """All rows of theory.csv (see the package docstring for the columns).

    method: ``population`` (exact regression), ``sampled`` (n_samples fresh samples per step; model
    ``diagonal`` for every case, ``full`` d × d maps for ``full_cases`` and ``full_dims``, by default the
    dims ≤ FULL_MAX_DIM),
    ``perturbed-total`` (population, every slope × (1 + δ)^{1/(N−1)}: the terminal map carries a relative
    error δ whatever N) and ``perturbed-step`` (population, every slope × (1 + δ): a per-step error that
    does not shrink with the step size). Deterministic rows have seed −1."""
    groups, mean, std = _coordinates(st)
    rows = []
    for N in st.ns:
        sig = karras_grid(N, st.sigma_min, st.sigma_max, st.rho)
        rows += _population_rows(st, groups, mean, std ** 2, N, sig)
        if st.seeds and st.n_samples:
            rows += _sampled_rows(st, groups, mean, std, N, sig)
    df = pd.DataFrame(rows)
    df["err"] = np.where(df["prior"] == "true", df["w2_x1"], df["w2_excess"])
    return df


# ----------------------------------------------------------------------------------------------------
# Rates and what is read off them
# ----------------------------------------------------------------------------------------------------
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


def additivity_table(df: pd.DataFrame, st: StudySettings) -> pd.DataFrame:
    """For the ``perturbed-total`` rows (true prior): err(N, δ) / (err(N, 0) + err(∞, δ)), where err(∞, δ) is
    the error of the exact map with its slope × (1 + δ) (= |δ|·sqrt(Σ_j (s_j² + σ_min²)) vs p_{σ_min}).
    1 means the discretisation and the injected error add; < 1 that they partly cancel."""
    base = df[(df["method"] == "population") & (df["prior"] == "true")].set_index(["case", "d", "N"])["err"]
    pert = df[(df["method"] == "perturbed-total") & (df["prior"] == "true")]
    out = []
    for (case, d, delta), g in pert.groupby(["case", "d", "delta"]):
        _, std = st.data(int(d), case)
        alone = abs(delta) * np.sqrt((std ** 2 + st.sigma_min ** 2).sum())
        ratio = g["err"].to_numpy() / (base.loc[[(case, d, n) for n in g["N"]]].to_numpy() + alone)
        out.append(dict(case=case, d=d, delta=delta, ratio_min=ratio.min(), ratio_max=ratio.max()))
    return pd.DataFrame(out)


def per_step_optimum(df: pd.DataFrame) -> pd.DataFrame:
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
