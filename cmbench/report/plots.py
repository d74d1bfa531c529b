"""The report's figures (seaborn/matplotlib, 110 dpi PNG, written atomically). A plot with nothing to show is a
placeholder figure that says why: the file must exist for Snakemake."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.ticker import NullFormatter

from cmbench import io
from cmbench.metrics.keys import FID, ODE_ERROR
from cmbench.report.claims import Claim, points
from cmbench.report.records import last_step, metric_rank, renoised, training_curves, with_keys
from cmbench.report.tables import fid_agreement

matplotlib.use("Agg")                 # files only, whatever display there is


def _save(fig, path: Path) -> None:
    """Write a Figure, or a seaborn grid (whose savefig crops to the tight bounding box), and free it."""
    io.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig.figure)


def placeholder(path: Path, text: str) -> None:
    """A small figure that says why there is nothing to plot."""
    fig, ax = plt.subplots(figsize=(4, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    _save(fig, path)


def metric_points(df: pd.DataFrame) -> pd.DataFrame:
    """What `plot_metrics` draws: each run's last-step records, without the ODE error of re-noising multi-step
    sampling (records.renoised), with a column key and a panel (dataset · key) each."""
    df = last_step(df)
    d = pd.concat([with_keys(g) for _, g in df[~renoised(df)].groupby("dataset")], ignore_index=True)
    return d.assign(panel=d["dataset"] + " · " + d["key"])   # only panels that have data (datasets differ in metrics)


def plot_metrics(df: pd.DataFrame, path: Path) -> None:
    """Metric vs NFE per variant (error bars: sd over seeds), from `metric_points`."""
    d = metric_points(df)
    order = [p for _, p in sorted({((ds, metric_rank(m), k), p)
                                   for ds, m, k, p in zip(d["dataset"], d["metric"], d["key"], d["panel"])})]
    g = sns.catplot(d, x="nfe", y="value", hue="variant", col="panel", col_order=order,
                    col_wrap=min(5, len(order)), kind="point", errorbar="sd", sharey=False, sharex=False,
                    height=2.6, aspect=1.1,
                    dodge=0.2 if d["variant"].nunique() > 1 else False)   # seaborn divides by (hues − 1)
    g.set_titles("{col_name}")
    _save(g, path)


def plot_training(df: pd.DataFrame, path: Path) -> None:
    curves = training_curves(df)
    if curves.empty:
        return placeholder(path, "no training statistics (stats.jsonl) beside the records")
    g = sns.relplot(curves, x="step", y="value", hue="variant", units="seed", estimator=None, col="quantity",
                    row="dataset", kind="line", height=2.6, aspect=1.3, facet_kws={"sharey": False},
                    linewidth=0.9, alpha=0.8)
    for ax in g.axes.flat:        # losses span decades across variants, and sCM's adaptive weighting goes below 0
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if ys and min(ys) > 0:
            ax.set_yscale("log")
        elif any(ys):
            ax.set_yscale("symlog", linthresh=float(pd.Series([abs(y) for y in ys if y]).quantile(0.05)))
    g.set_titles("{row_name} · {col_name}")
    _save(g, path)


def plot_fid_agreement(df: pd.DataFrame, path: Path) -> None:
    a = fid_agreement(df)
    if a.empty:
        has_fid = (df["metric"] == FID).any()
        return placeholder(path, "no FID records from both torch-fidelity and clean-fid on the same samples"
                           if has_fid else "no FID records")
    a = a.assign(mode=a["mode"].replace("", "default"))
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    sns.scatterplot(a, x="tf", y="cf", hue="mode", style="dataset", ax=ax)
    lo, hi = min(a["tf"].min(), a["cf"].min()), max(a["tf"].max(), a["cf"].max())
    pad = 0.05 * (hi - lo or 1)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, ls="--", label="y = x")
    ax.set(xlabel="FID, torch-fidelity", ylabel="FID, clean-fid")
    worst = ", ".join(f"{m} {100 * g['rel_diff'].max():.2g}%" for m, g in a.groupby("mode", sort=True))
    ax.set_title(f"FID library agreement\nmax relative difference: {worst}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_ode_vs_quality(df: pd.DataFrame, path: Path, claim: Claim) -> None:
    """Per-seed points: ODE error (x) vs quality (y), one panel per dataset · quality metric and NFE; the claim's
    two variants highlighted."""
    p = points(df)
    if p.empty:
        return placeholder(path, f"no {ODE_ERROR} records (ODE error vs quality is a toy-suite study)")
    panels, nfes = sorted(p["panel"].unique()), sorted(p["nfe"].unique())
    fig, axes = plt.subplots(len(panels), len(nfes), figsize=(3.6 * len(nfes) + 1.2, 3.0 * len(panels)),
                             squeeze=False, layout="constrained")
    variants = sorted(p["variant"].unique())
    palette = dict(zip(variants, sns.color_palette("tab10", len(variants))))
    for i, panel in enumerate(panels):
        for j, nfe in enumerate(nfes):
            ax, s = axes[i][j], p[(p["panel"] == panel) & (p["nfe"] == nfe)]
            for v, g in s.groupby("variant"):
                focus = v in claim.names
                ax.scatter(g["ode"], g["quality"], color=palette[v], s=60 if focus else 18,
                           marker="D" if focus else "o", edgecolor="black" if focus else "none",
                           alpha=1 if focus else 0.6, label=claim.names.get(v, v), zorder=3 if focus else 2)
            for col, axis, scale in (("ode", ax.xaxis, ax.set_xscale), ("quality", ax.yaxis, ax.set_yscale)):
                v = s[col]
                if len(v) and v.min() > 0 and v.max() / v.min() > 10:   # log only over more than a decade
                    scale("log")
                    axis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=7)
            ax.set(xlabel="ODE error", ylabel=panel.split(" · ")[1], title=f"{panel} · NFE {nfe}")
            ax.title.set_fontsize(9)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8)
    _save(fig, path)
