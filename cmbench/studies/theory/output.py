"""The study's outputs: theory.csv, theory_slopes.csv, theory_summary.md and .tex (the findings, every number
read off the results, and the rate tables, written with cmbench.report.tables), and theory.png. Each file is
written atomically (cmbench.io)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cmbench import io
from cmbench.report.tables import PLAIN, md_table, tex_table, write_csv, write_lines
from cmbench.studies.theory.experiment import BOUND_D_EXPONENT, StudySettings

MECHANISM = ("Mechanism (closed form): each population step multiplies the slope by (s² + σ_i σ_{i+1})/(s² + "
             "σ_{i+1}²) and keeps b = μ(1 − a) exact, so a_N/a* = Π_i (s² + σ_i σ_{i+1})/sqrt((s² + σ_i²)"
             "(s² + σ_{i+1}²)) ≤ 1 (Cauchy–Schwarz): the CT fixed point under-disperses, by a relative "
             "amount Σ_i s²(σ_{i+1} − σ_i)²/(2(s² + σ²)²) = O(1/N) per coordinate. With n samples per step "
             "the slope noise has variance s²(σ_{i+1} − σ_i)²/(n(s² + σ²)²) per step, i.e. O(1/(nN)) in "
             "total, so estimation error does not accumulate over steps.")
BOUND = ("The bound (papers.md §7, Li, Huang & Wei 2024) is on W1 for a DDPM-type chain, with Lipschitz "
         "constants and log factors; a smaller d-exponent here is not a contradiction. With Gaussian data "
         "and an affine model every coordinate (eigen-direction) carries its own O(1/N) discretisation "
         "error, so W2 grows like sqrt(d) for a fixed per-coordinate spectrum; the sampled rows add the "
         "d-dependence of estimation (d + 1 regressors per output for full maps).")
ADDITIVITY = ("err(N, δ) / (err(N, 0) + err(∞, δ)), min and max over N; every fitted slope × (1 + δ)^{1/(N−1)} "
              "so the terminal map carries a relative slope error δ. 1 = the two errors add.")
PER_STEP = "Every fitted slope × (1 + δ): the error accumulates over the N steps, so there is an optimal N."


# ----------------------------------------------------------------------------------------------------
# Cells and tables
# ----------------------------------------------------------------------------------------------------
def _fmt_slope(v) -> str:
    if isinstance(v, (float, np.floating)) and np.isnan(v):
        return "n/a"
    return f"{v:+.3f}"


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
    out.index.name = "series"
    rows = per_d.set_index(["series", "d"])
    for d in tab.columns:            # "not run": e.g. the full fits skip d > FULL_MAX_DIM by default
        out[f"d={d}"] = [fmt(v, rows.loc[(s, d)]) if (s, d) in rows.index else "not run"
                         for s, v in tab[d].items()]
    return out


def _range(v: pd.Series, fmt: str = "+.2f") -> str:
    lo, hi = format(v.min(), fmt), format(v.max(), fmt)
    return lo if lo == hi else f"{lo} to {hi}"


def _rate_tables(per_d: pd.DataFrame, per_series: pd.DataFrame) -> list[pd.DataFrame]:
    """Rows series, columns d: the slope of the error vs N, its terminal slope, and N_ε (with its slope vs d)."""
    slope_tab = _pivot(per_d, "slope", lambda v, r: _fmt_slope(v))
    term_tab = _pivot(per_d, "slope_terminal", lambda v, r: _fmt_slope(v))
    neps_tab = _pivot(per_d, "n_eps", lambda v, r: _fmt_neps(v, r["n_min"], r["n_max"]))
    ps = per_series.set_index("series")
    neps_tab["slope vs d"] = [_fmt_slope(ps.loc[i, "n_eps_d_slope"]) for i in neps_tab.index]
    neps_tab["slope, last 3 d"] = [_fmt_slope(ps.loc[i, "n_eps_d_slope_terminal"]) for i in neps_tab.index]
    neps_tab["bound order"] = f"d^{BOUND_D_EXPONENT:g}/ε"
    return [slope_tab, term_tab, neps_tab]


def _additivity_table(add: pd.DataFrame) -> pd.DataFrame:
    """Rows case · d, columns min and max ratio per δ."""
    add = add.sort_values(["case", "d", "delta"])
    tab = (add.assign(case_d=lambda x: x["case"] + " · d=" + x["d"].astype(str))
           .pivot(index="case_d", columns="delta", values=["ratio_min", "ratio_max"])
           .reindex(list(dict.fromkeys(add["case"] + " · d=" + add["d"].astype(str)))))
    tab = tab[[(c, dl) for dl in sorted(add["delta"].unique()) for c in ("ratio_min", "ratio_max")]]
    tab.columns = [f"{'min' if c == 'ratio_min' else 'max'} ratio, δ={dl:g}" for c, dl in tab.columns]
    tab = tab.map(lambda v: f"{v:.4f}")
    tab.index.name = "case · d"
    return tab


def _step_table(step_opt: pd.DataFrame) -> pd.DataFrame:
    """Rows case: the optimal N and its error per δ."""
    return step_opt.assign(delta=lambda x: x["delta"].map(lambda v: f"{v:g}"),
                           n_best=lambda x: x["n_best"].map(lambda v: f"{v:g}"),
                           err_best=lambda x: x["err_best"].map(lambda v: f"{v:.3g}")).set_index("case")


# ----------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------
def findings(df, per_d, per_series, add, step_opt, st: StudySettings) -> str:
    """One sentence of findings, every number taken from the results."""
    pop = per_d[(per_d["method"] == "population") & (per_d["prior"] == "true")]
    ser = per_series.set_index(["case", "method", "model", "prior"])
    parts = [f"Population CT (exact least-squares steps, zero approximation error) has a W2 error to p_σmin "
             f"(true prior) falling as N^k with k = {_range(pop['slope'])} (N ≥ {st.fit_min_n}, every d and "
             f"spectrum)"]
    q = [f"d^{ser.loc[key, 'n_eps_d_slope']:.2f} ({key[0]}; last three d: "
         f"d^{ser.loc[key, 'n_eps_d_slope_terminal']:.2f})"
         for key in [(c, "population", "diagonal", "true") for c in pop["case"].unique()] if key in ser.index]
    if q:
        parts.append(f"so N_ε (ε = {st.eps:g}) grows as {' and '.join(q)}, far below the d^{BOUND_D_EXPONENT:g}/ε "
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
        parts.append(f"fitting each step on n = {st.n_samples} fresh samples adds an error that {trend} with N "
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


def _setup(st: StudySettings) -> str:
    """What was computed, with the settings' numbers."""
    return (f"Data N(μ·1, diag(s²)), μ = {st.mu:g}; spectra: isotropic s = {st.s:g}, log-uniform s ∈ "
            f"[{st.s_lo:g}, {st.s_hi:g}] (mid-quantiles). Karras grid σ ∈ [{st.sigma_min:g}, {st.sigma_max:g}], "
            f"ρ = {st.rho:g}, N ∈ {list(st.ns)}; d ∈ {list(st.dims)}. Affine CT recursion from f_1 = id; "
            f"`population` = exact least-squares regressions (what CT with an ℓ2 loss converges to with infinite "
            f"data and a perfect optimiser: pure discretisation error), `sampled` = each step fitted on n = "
            f"{st.n_samples} fresh samples (seeds {list(st.seeds)}, mean W2 over seeds). Error = W2 to p_σmin for "
            f"the true prior N(μ, s² + σ_max²) (0 for the exact map), and W2 to the data minus the exact map's "
            f"floor for the sampler prior N(0, σ_max²). Slopes fitted on N ≥ {st.fit_min_n}; terminal slope on the "
            f"last 3 N.")


def _sections(per_d, per_series, add, step_opt, st: StudySettings) -> list[tuple]:
    """(Markdown heading, note or None, table, LaTeX caption) of each table of the summary."""
    slope_tab, term_tab, neps_tab = _rate_tables(per_d, per_series)
    sections = [(f"Log-log slope of the error vs N (N ≥ {st.fit_min_n})", None, slope_tab,
                 f"Log-log slope of the W2 error vs N (N ≥ {st.fit_min_n})."),
                ("Terminal slope (last 3 grid values of N)", None, term_tab,
                 "Terminal log-log slope (last 3 grid values of N)."),
                (f"N_ε for ε = {st.eps:g} and its log-log slope vs d", None, neps_tab,
                 f"N_ε for ε = {st.eps:g} and its log-log slope vs d.")]
    if len(add):
        sections.append(("Additivity of an injected terminal error", ADDITIVITY, _additivity_table(add),
                         "Additivity ratio of an injected terminal error."))
    if len(step_opt):
        sections.append(("Per-step error that does not shrink with the step size", PER_STEP, _step_table(step_opt),
                         "Optimal N under a per-step slope error δ."))
    return sections


def _summary(df, per_d, per_series, add, step_opt, st: StudySettings) -> tuple[list[str], list[str]]:
    """The lines of theory_summary.md and theory_summary.tex."""
    setup, found = _setup(st), findings(df, per_d, per_series, add, step_opt, st)
    md = ["# Theory study: CT steps needed on Gaussian data", "", setup, "", f"**Findings.** {found}", "",
          MECHANISM, "", BOUND, ""]
    tex = [f"% Theory study (cmbench.studies.theory). {PLAIN.escape(setup)}", "",
           f"% Findings: {PLAIN.escape(found)}", "", f"% {PLAIN.escape(MECHANISM)}", ""]
    for heading, note, tab, caption in _sections(per_d, per_series, add, step_opt, st):
        md += [f"## {heading}", "", *([note, ""] if note else []), md_table(tab, aligned=True), ""]
        tex += [tex_table(tab, caption, PLAIN), ""]
    return md, tex


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
def _fit(d: pd.DataFrame) -> np.ndarray:
    """The legend label of each row's fit: population, or sampled (model)."""
    return np.where(d["method"] == "population", "population", "sampled (" + d["model"] + ")")


def plot(df, per_d, path: Path, eps: float) -> None:
    """Error vs N per spectrum (true prior), and N_ε vs d against the d^{5/2} of the bound."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    main = df[df["method"].isin(["population", "sampled"]) & (df["prior"] == "true")].copy()
    main["fit"] = _fit(main)
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
    ok["fit"] = ok["case"] + " · " + _fit(ok)
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
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)



def write_study(out_dir: Path, st: StudySettings, df, per_d, per_series, add, step_opt) -> list[Path]:
    """theory.csv (df), theory_slopes.csv (per d, with the series' slopes vs d), the summary and (st.plot) the
    plot, in out_dir; returns their paths."""
    slopes = per_d.merge(per_series[["series", "n_eps_d_slope", "n_eps_d_slope_terminal", "n_eps_d_points",
                                     "bound_d_exponent"]],
                         on="series")
    slopes.insert(0, "eps", st.eps)
    md, tex = _summary(df, per_d, per_series, add, step_opt, st)
    paths = [write_csv(out_dir / "theory.csv", df), write_csv(out_dir / "theory_slopes.csv", slopes),
             write_lines(out_dir / "theory_summary.md", md), write_lines(out_dir / "theory_summary.tex", tex)]
    if st.plot:
        plot(df, per_d, out_dir / "theory.png", st.eps)
        paths.append(out_dir / "theory.png")
    return paths
