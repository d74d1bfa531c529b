"""The report job (`cmbench report`): a suite's metric records → its tables and plots. The ODE-error-vs-quality
study tests one claim, `claims.DIRECT_CM_VS_CD`."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from cmbench.config import ConfigError
from cmbench.report import papers
from cmbench.report.budget import plot_budget, write_budget_tables
from cmbench.report.claims import DIRECT_CM_VS_CD, write_ode_vs_quality
from cmbench.report.outputs import PLOTS, plot_file, records_csv
from cmbench.report.plots import plot_fid_agreement, plot_metrics, plot_ode_vs_quality, plot_training
from cmbench.report.records import load_records
from cmbench.report.tables import write_csv, write_summary


def write_tables(df: pd.DataFrame, suite: str, tables: str | Path, numbers: dict) -> list[Path]:
    """records_{suite}.csv, the summary, the ODE-error-vs-quality and the training-budget tables; numbers:
    `papers.primary_numbers`."""
    tables = Path(tables)
    records = write_csv(records_csv(tables, suite), df.assign(mode=df["mode"].mask(df["mode"] == "")), na_rep="NA")
    return [records, *write_summary(df, suite, numbers, tables),
            *write_ode_vs_quality(df, suite, tables, DIRECT_CM_VS_CD), *write_budget_tables(df, suite, tables)]


def write_plots(df: pd.DataFrame, suite: str, plots: str | Path) -> list[Path]:
    """The figures of outputs.PLOTS, in that order."""
    draw = {"metrics": plot_metrics, "training": plot_training, "fid_agreement": plot_fid_agreement,
            "ode_vs_quality": lambda d, path: plot_ode_vs_quality(d, path, DIRECT_CM_VS_CD),
            "budget_images": lambda d, path: plot_budget(d, path, "images"),
            "budget_flops": lambda d, path: plot_budget(d, path, "train_flops")}
    out = [plot_file(plots, suite, name) for name in PLOTS]
    for name, path in zip(PLOTS, out):
        draw[name](df, path)
    return out


def build(suite: str, files, tables: str | Path, plots: str | Path,
          paper_numbers: str | Path | None = None) -> list[Path]:
    """See `cmbench.report.report`."""
    df = load_records(files)
    path = Path(paper_numbers) if paper_numbers is not None else papers.default_paper_numbers()
    if path is None and df["dataset"].isin(papers.PAPER_DATASETS).any():
        raise ConfigError(f"records of {', '.join(papers.PAPER_DATASETS)} need the reported numbers: "
                          f"{papers.DEFAULT_PAPER_NUMBERS} not found (pass --paper-numbers)")
    numbers = papers.primary_numbers(papers.load_paper_numbers(path)) if path is not None else {}
    return write_tables(df, suite, tables, numbers) + write_plots(df, suite, plots)
