"""Collate metric records → tidy DataFrame → tables (CSV, Markdown) and seaborn plots. Never imports torch."""
import json
from pathlib import Path

import pandas as pd

ID_COLUMNS = ["suite", "dataset", "variant", "seed", "nfe", "metric", "backend", "value", "ideal"]


def load_records(files) -> pd.DataFrame:
    rows = [r for f in files for r in json.loads(Path(f).read_text())]
    df = pd.DataFrame(rows)
    df["sigmas"] = df["sigmas"].map(lambda s: " ".join(f"{x:g}" for x in s))
    return df[ID_COLUMNS + [c for c in df.columns if c not in ID_COLUMNS]].sort_values(
        ["suite", "dataset", "variant", "metric", "nfe", "seed"], ignore_index=True)


def _mean_sd(v: pd.Series) -> str:
    return f"{v.mean():.4g} ± {v.std():.2g}" if len(v) > 1 else f"{v.mean():.4g}"


def summary_markdown(df: pd.DataFrame, suite: str) -> str:
    """One table per dataset: rows are variants, columns metric × NFE, cells mean ± sd over seeds; the
    'ideal' row is what a perfect model scores at the same sample count (sampling-noise floor; n/a where
    no such value exists, e.g. the ODE error of a 2-step sampler, which re-noises)."""
    lines = [f"# cmbench summary: suite `{suite}`", "",
             "Mean ± sd over seeds; `ideal` is what exact samples score at the same n (the noise floor); "
             "— marks an NFE a variant is not evaluated at (the `edm` teacher is sampled with Heun, NFE 35).", ""]
    for dataset, d in df.groupby("dataset", sort=True):
        cells = d.groupby(["variant", "metric", "nfe"])["value"].agg(_mean_sd).unstack(["metric", "nfe"])
        ideal = d.groupby(["metric", "nfe"])["ideal"].first().map(
            lambda v: "n/a" if pd.isna(v) else f"{v:.4g}").to_frame("ideal").T
        table = pd.concat([cells, ideal]).sort_index(axis=1).fillna("—")   # —: not evaluated at this NFE
        table.columns = [f"{m} @{n}" for m, n in table.columns]
        seeds = sorted(int(s) for s in d["seed"].unique())
        lines += [f"## {dataset}", "", f"{d['n_gen'].iloc[0]} samples per run; seeds {seeds}.", "",
                  table.to_markdown(), ""]
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import seaborn as sns

    g = sns.catplot(df, x="nfe", y="value", hue="variant", col="metric", row="dataset", kind="point",
                    errorbar="sd", sharey=False, height=2.6, aspect=1.1,
                    dodge=0.2 if df["variant"].nunique() > 1 else False)   # seaborn divides by (hues − 1)
    g.set_titles("{row_name} · {col_name}")
    g.savefig(path, dpi=110)


def report(suite: str, files, tables: str | Path, plots: str | Path) -> list[Path]:
    tables, plots = Path(tables), Path(plots)
    tables.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)
    df = load_records(files)
    out = [tables / "records.csv", tables / f"summary_{suite}.md", plots / f"{suite}_metrics.png"]
    df.to_csv(out[0], index=False)
    out[1].write_text(summary_markdown(df, suite))
    plot(df, out[2])
    return out
