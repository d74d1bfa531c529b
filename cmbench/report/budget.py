"""Quality against training budget (issue 12): the records of each run's evaluated checkpoints (fields `step`,
`images`, `train_seconds`, `train_flops`) → metric against training images and against training FLOPs per variant
(seeds as min–max bands), a matched-budget table (every variant at the image counts all of them have) and the
images (and FLOPs) each variant needed to reach a stated quality. Records without those fields (written before
checkpoint evaluation existed) give outputs that say so."""
from __future__ import annotations

import math
from numbers import Integral
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.ticker import EngFormatter, MaxNLocator

from cmbench.metrics.keys import HIGHER_IS_BETTER
from cmbench.report.outputs import budget_files
from cmbench.report.plots import _save, placeholder
from cmbench.report.records import metric_rank, with_keys
from cmbench.report.tables import BOOKTABS, TEX_HEADER, md_table, tex_table, write_csv, write_lines

TEACHER = "edm"        # "images to reach" aims at this variant's final value, within FACTOR
FACTOR = 2
NOT_REACHED, NA = "not reached", "n/a"
NO_BUDGET = ("The records carry no training budget (fields step and images): they were written before checkpoint "
             "evaluation existed. Re-run the suite to get them.")
POINT = ["dataset", "key", "metric", "nfe", "variant", "images"]   # one checkpoint of one variant, seeds pooled
CHECKPOINT_COLUMNS = POINT + ["train_flops", "mean", "sd", "min", "max", "seeds", "ideal"]
REACH_HEADERS = {"nfe": "NFE", "images": "images to reach", "train_flops": "FLOPs to reach"}
X_LABEL = {"images": "training images", "train_flops": "training FLOPs (estimate)"}


# ---------------------------------------------------------------------------------------------------------------
# Records → checkpoints
# ---------------------------------------------------------------------------------------------------------------
def budget_records(df: pd.DataFrame) -> pd.DataFrame:
    """The records that carry a training-image count, each with its column key (`records.with_keys`, per
    dataset); images and train_flops numeric (train_flops NaN where not estimated)."""
    if "images" not in df:
        return df.iloc[:0].assign(key=None, images=None, train_flops=None)
    d = df.assign(images=pd.to_numeric(df["images"], errors="coerce"),
                  train_flops=pd.to_numeric(df["train_flops"], errors="coerce") if "train_flops" in df else math.nan)
    d = d.dropna(subset=["images"])
    if d.empty:
        return d.assign(key=None)
    d = pd.concat([with_keys(g) for _, g in d.groupby("dataset")], ignore_index=True)
    return d.assign(images=d["images"].astype(int))


def checkpoints(df: pd.DataFrame) -> pd.DataFrame:
    """One row per dataset, metric key, NFE, variant and training-image count: the value's mean, sd, min and max
    over seeds, the number of seeds, and the mean training FLOPs and ideal value there (CHECKPOINT_COLUMNS)."""
    d = budget_records(df)
    if d.empty:
        return pd.DataFrame(columns=CHECKPOINT_COLUMNS)
    c = d.groupby(POINT).agg(mean=("value", "mean"), sd=("value", "std"), min=("value", "min"),
                             max=("value", "max"), seeds=("seed", "nunique"), train_flops=("train_flops", "mean"),
                             ideal=("ideal", "mean")).reset_index()
    order = sorted(range(len(c)), key=lambda i: (c["dataset"][i], metric_rank(c["metric"][i]), c["key"][i],
                                                 c["nfe"][i], c["variant"][i], c["images"][i]))
    return c.iloc[order].reset_index(drop=True)[CHECKPOINT_COLUMNS]


def common_images(c: pd.DataFrame) -> dict[str, list[int]]:
    """dataset → the training-image counts at which every variant of the dataset has a record."""
    return {ds: sorted(set.intersection(*(set(g["images"]) for _, g in d.groupby("variant"))))
            for ds, d in c.groupby("dataset", sort=True)}


def matched_budget(c: pd.DataFrame) -> pd.DataFrame:
    """The checkpoints (rows of `checkpoints`) at the image counts common to every variant of their dataset."""
    common = common_images(c)
    keep = pd.Series([im in common[ds] for ds, im in zip(c["dataset"], c["images"])], index=c.index, dtype=bool)
    return c[keep].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------------
# Images to reach
# ---------------------------------------------------------------------------------------------------------------
def threshold(c: pd.DataFrame, dataset: str, key: str, metric: str, nfe: int) -> tuple[float, str] | None:
    """(value, rule) a checkpoint must reach for (dataset, key, NFE): the teacher's final value (mean over seeds
    at its last checkpoint and highest NFE) × FACTOR (÷ FACTOR for a higher-is-better metric); without teacher
    records of the key, a positive ideal (what exact samples score) × FACTOR (÷); None when neither exists."""
    op = "÷" if metric in HIGHER_IS_BETTER else "×"
    scale = 1 / FACTOR if metric in HIGHER_IS_BETTER else FACTOR
    t = c[(c["dataset"] == dataset) & (c["key"] == key) & (c["variant"] == TEACHER)]
    if len(t):
        t = t[t["nfe"] == t["nfe"].max()]
        last = t[t["images"] == t["images"].max()].iloc[0]
        return float(last["mean"]) * scale, f"{TEACHER} final (NFE {last['nfe']}) {op} {FACTOR}"
    ideal = c[(c["dataset"] == dataset) & (c["key"] == key) & (c["nfe"] == nfe)]["ideal"].dropna()
    if len(ideal) and ideal.mean() > 0:         # an ideal of 0 (e.g. the ODE error of one exact step) sets no bar
        return float(ideal.mean()) * scale, f"ideal {op} {FACTOR}"
    return None


def images_to_reach(c: pd.DataFrame) -> pd.DataFrame:
    """Per dataset, metric key, NFE and variant: the first checkpoint (fewest training images) whose mean over
    seeds is at or below the threshold (at or above for HIGHER_IS_BETTER), with its training images and FLOPs;
    NOT_REACHED when no checkpoint is, NA when there is no threshold."""
    rows = []
    for (ds, key, metric, nfe, variant), g in c.groupby(POINT[:-1], sort=False):
        higher, t = metric in HIGHER_IS_BETTER, threshold(c, ds, key, metric, nfe)
        value, rule, images, flops = NA, NA, NA, NA
        if t is not None:
            value, rule = t
            hit = g[g["mean"] >= value] if higher else g[g["mean"] <= value]
            images = flops = NOT_REACHED
            if len(hit):
                first = hit.loc[hit["images"].idxmin()]
                images = int(first["images"])
                flops = NA if math.isnan(first["train_flops"]) else float(first["train_flops"])
        rows.append([ds, key, nfe, variant, "≥" if higher else "≤", value, rule, images, flops, g["seeds"].max(),
                     len(g)])
    return pd.DataFrame(rows, columns=["dataset", "metric", "nfe", "variant", "reach", "threshold", "rule", "images",
                                       "train_flops", "seeds", "checkpoints"])


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------
def _g(x) -> str:
    """A float at 3 significant digits, a count with thousands separators, a word as it is."""
    return f"{x:.3g}" if isinstance(x, float) else f"{x:,}" if isinstance(x, Integral) else str(x)


def _cell(r) -> str:
    return _g(r["mean"]) if r["seeds"] == 1 else f"{_g(r['mean'])} ± {r['sd']:.2g}"


def _matched_table(m: pd.DataFrame) -> pd.DataFrame:
    """Rows: variant per metric and NFE (with its seed count); a column per common training-image count."""
    rows = []
    for (key, nfe, variant), g in m.groupby(["key", "nfe", "variant"], sort=False):
        cells = {f"{im:,} images": _cell(r) for im, r in zip(g["images"], g.to_dict("records"))}
        rows.append({"variant": variant, "metric": key, "NFE": nfe, "seeds": g["seeds"].max(), **cells})
    return pd.DataFrame(rows).set_index("variant").fillna(NA)


def _single_step(c: pd.DataFrame) -> bool:
    return bool(len(c)) and bool((c.groupby(POINT[:-1])["images"].nunique() == 1).all())


def _write(paths: list[Path], title: str, legend: list[str], csv: pd.DataFrame,
           sections: dict[str, tuple[str, pd.DataFrame | None]]) -> list[Path]:
    """CSV, Markdown and LaTeX of a table: a title and legend, then per dataset a note and its table (None: the
    note says why there is none)."""
    md = [f"# {title}", "", *[f"- {x}" for x in legend], ""]
    tex = [TEX_HEADER, f"% {title}", *[f"% {x}" for x in legend], ""]
    for dataset, (note, t) in sections.items():
        md += [f"## {dataset}", "", note, ""] + ([md_table(t), ""] if t is not None else [])
        tex += ([f"% {dataset}", tex_table(t, f"{title}, {dataset}: {note}"), ""] if t is not None
                else [f"% {dataset}: {BOOKTABS.escape(note)}", ""])
    if not sections:
        md.append(NO_BUDGET)
        tex.append(f"% {NO_BUDGET}")
    write_csv(paths[0], csv)
    write_lines(paths[1], md)
    write_lines(paths[2], tex)
    return paths


def write_budget_tables(df: pd.DataFrame, suite: str, tables: str | Path) -> list[Path]:
    """The matched-budget and images-to-reach tables (outputs.budget_files)."""
    c = checkpoints(df)
    files = budget_files(tables, suite)
    once = (" Each run was evaluated at one step only (no intermediate checkpoints: evaluate.every unset)."
            if _single_step(c) else "")
    m, common = matched_budget(c), common_images(c)
    sections = {}
    for ds, d in c.groupby("dataset", sort=True):
        variants = ", ".join(sorted(set(d["variant"])))
        if common[ds]:
            note = (f"Training-image counts at which every variant ({variants}) has a record: "
                    f"{', '.join(f'{im:,}' for im in common[ds])}.{once}")
            sections[ds] = note, _matched_table(m[m["dataset"] == ds])
        else:
            sections[ds] = (f"No training-image count at which every variant ({variants}) has a record: their "
                            f"evaluated checkpoints differ.{once}"), None
    legend = ["Cells: mean ± sd over training seeds (seeds: n; one seed: no sd) of the records at that number of "
              "training images (step × batch); only counts at which every variant of the dataset was evaluated.",
              "The CSV holds one row per dataset, metric, NFE, variant and image count, at full precision."]
    out = _write(files[:3], f"Matched training budget: suite {suite}", legend,
                 m.drop(columns="metric").rename(columns={"key": "metric"}), sections)

    r = images_to_reach(c)
    rule = (f"Threshold: the {TEACHER} teacher's final value (mean over seeds, at its highest NFE) × {FACTOR} for a "
            f"lower-is-better metric, ÷ {FACTOR} for a higher-is-better one ({', '.join(sorted(HIGHER_IS_BETTER))}); "
            f"without {TEACHER} records, the ideal (what exact samples score) × {FACTOR} (÷ {FACTOR}) where it is "
            "above 0; else n/a.")
    legend = [rule, "Images / FLOPs to reach (CSV: images, train_flops): the first checkpoint (fewest training images) whose mean over seeds is at "
                    f"or below the threshold (at or above where reach is ≥); `{NOT_REACHED}`: no checkpoint is; "
                    "FLOPs n/a where the run has no FLOP estimate. checkpoints: the evaluated image counts."]
    sections = {ds: (f"Variants: {', '.join(sorted(set(d['variant'])))}.{once}",
                     d.drop(columns="dataset").set_index("variant").map(_g).rename(columns=REACH_HEADERS))
                for ds, d in r.groupby("dataset", sort=True)}
    return out + _write(files[3:], f"Training images to reach a quality: suite {suite}", legend, r, sections)


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------
def headline(d: pd.DataFrame) -> pd.DataFrame:
    """Each variant's records at its lowest NFE (the students' one-step quality; the teacher's own sampler), each
    labelled `variant (NFE n)`."""
    d = d[d["nfe"] == d.groupby(["dataset", "key", "variant"])["nfe"].transform("min")]
    return d.assign(label=[f"{v} (NFE {n})" for v, n in zip(d["variant"], d["nfe"])])


def _log_if_wide(values: pd.Series, set_scale) -> bool:
    """Log scale over more than a decade of positive values; whether it set it."""
    wide = bool(len(values)) and values.min() > 0 and values.max() / values.min() > 10
    if wide:
        set_scale("log")
    return wide


def draw_curves(d: pd.DataFrame, x: str, labels: list[str] | None = None) -> plt.Figure:
    """One panel per dataset · metric key: per variant (one colour) the mean over seeds against x (images or
    train_flops), with a band from the min to the max over seeds; d: `headline` records. labels: every variant
    label to give a colour (default: those of d), so that two figures colour a variant alike."""
    panels = sorted({(ds, metric_rank(m), k) for ds, m, k in zip(d["dataset"], d["metric"], d["key"])})
    labels = labels or sorted(d["label"].unique())
    palette = dict(zip(labels, sns.color_palette("tab10", len(labels))))
    ncols = min(4, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols + 1.8, 2.8 * nrows), squeeze=False,
                             layout="constrained")
    for ax, (ds, _, key) in zip(axes.flat, panels):
        s = d[(d["dataset"] == ds) & (d["key"] == key)]
        sns.lineplot(s, x=x, y="value", hue="label", palette=palette, hue_order=sorted(s["label"].unique()),
                     estimator="mean", errorbar=("pi", 100), marker="o", markersize=4, ax=ax, legend=False)
        if not _log_if_wide(s[x], ax.set_xscale):
            ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))      # 20k images, 1.2T FLOPs
        _log_if_wide(s["value"], ax.set_yscale)
        ax.tick_params(labelsize=7)
        ax.set(xlabel=X_LABEL[x], ylabel=key, title=f"{ds} · {key}")
        ax.title.set_fontsize(9)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=palette[lb], marker="o", markersize=4, label=lb) for lb in labels
               if lb in set(d["label"])]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="mean; band: min–max over seeds",
               title_fontsize=7)
    return fig


def plot_budget(df: pd.DataFrame, path: Path, x: str) -> None:
    """Metric against x (images or train_flops) per variant, seeds as bands: `draw_curves` of `headline`."""
    d = budget_records(df)
    if d.empty:
        return placeholder(path, NO_BUDGET)
    d = headline(d)
    labels = sorted(d["label"].unique())
    if x == "train_flops":
        d = d.dropna(subset=["train_flops"])
        if d.empty:
            return placeholder(path, "No training-FLOP estimates in the records (train_flops is null).")
    _save(draw_curves(d, x, labels), path)
