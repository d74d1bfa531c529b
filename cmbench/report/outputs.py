"""The files the report writes for a suite: a pure function of the names, so Snakemake knows them when it parses
the workflow (and this module imports nothing heavy). The writers take their paths from here."""
from __future__ import annotations

from pathlib import Path

PLOTS = ("metrics", "training", "fid_agreement", "ode_vs_quality", "budget_images", "budget_flops")


def records_csv(tables: str | Path, suite: str) -> Path:
    """The suite's own: running one suite leaves another's records in place."""
    return Path(tables) / f"records_{suite}.csv"


def summary_files(tables: str | Path, suite: str) -> list[Path]:
    """The summary as CSV, Markdown and LaTeX."""
    return [Path(tables) / f"summary_{suite}.{ext}" for ext in ("csv", "md", "tex")]


def ode_vs_quality_files(tables: str | Path, suite: str) -> list[Path]:
    """The ODE-error-vs-quality table as CSV, Markdown and LaTeX, then its verdicts as CSV."""
    tables = Path(tables)
    return ([tables / f"ode_vs_quality_{suite}.{ext}" for ext in ("csv", "md", "tex")]
            + [tables / f"ode_vs_quality_verdicts_{suite}.csv"])


def budget_files(tables: str | Path, suite: str) -> list[Path]:
    """The matched-budget table as CSV, Markdown and LaTeX, then images-to-reach as the same three."""
    return [Path(tables) / f"{name}_{suite}.{ext}" for name in ("budget", "images_to_reach")
            for ext in ("csv", "md", "tex")]


def plot_file(plots: str | Path, suite: str, name: str) -> Path:
    return Path(plots) / f"{suite}_{name}.png"


def picture_files(plots: str | Path, suite: str, dataset: str) -> list[Path]:
    """A dataset's sample picture (cmbench.report.pictures) and, beside it, its source: an npz naming the run,
    variant, NFE and sample seeds of every panel."""
    stem = Path(plots) / f"{suite}_{dataset}_samples"
    return [stem.with_suffix(".png"), stem.with_suffix(".npz")]


def picture_kind(dataset) -> str:
    """How a dataset's samples are drawn (dataset: a RunConfig.dataset): `images` (grids of samples), `histogram`
    (1-D toy data, over the exact density) or `scatter` (toy data of 2+ dimensions: the first two coordinates,
    over the exact endpoints of the same noise)."""
    if dataset.kind == "image":
        return "images"
    return "histogram" if dataset.shape == (1,) else "scatter"


def report_outputs(suite: str, tables: str | Path, plots: str | Path) -> list[Path]:
    """Every file `report` writes for a suite (Snakemake's rule outputs), in the order it writes them."""
    return ([records_csv(tables, suite)] + summary_files(tables, suite) + ode_vs_quality_files(tables, suite)
            + budget_files(tables, suite) + [plot_file(plots, suite, name) for name in PLOTS])
