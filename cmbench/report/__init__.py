"""Collate metric records → tidy DataFrame → tables (CSV, Markdown, LaTeX) and seaborn plots. Never imports torch;
importing this package imports no pandas, matplotlib or seaborn either (the workflow calls `report_outputs` and
`load_paper_numbers` while Snakemake parses it): `report` imports them when called.

Outputs of one suite (`report_outputs`, a pure function of the suite name, so Snakemake knows them up front):

    tables/records.csv                         every record, tidy
    tables/summary_{suite}.{csv,md,tex}         per dataset: rows variants (+ the `ideal` noise floor where records
                                                carry one), columns metric [backend/mode] × NFE; FID columns of
                                                datasets with paper numbers get the paper value, Δ and a
                                                protocol-match flag beside them
    tables/ode_vs_quality_{suite}.{csv,md,tex}  ODE error vs sample quality per dataset, NFE and variant (toy data;
                                                images: runs with a trained teacher, at one step)
    tables/ode_vs_quality_verdicts_{suite}.csv  does "Direct CM: lower ODE error, worse samples than CD" hold here?
    plots/{suite}_metrics.png                   metric vs NFE per variant
    plots/{suite}_training.png                  training curves from each run's stats.jsonl
    plots/{suite}_fid_agreement.png             torch-fidelity vs clean-fid on the same samples
    plots/{suite}_ode_vs_quality.png            ODE error vs sample quality (CD and Direct CM highlighted)

Modules: outputs (the file names), papers (configs/paper_numbers.yaml, validated), records (records → DataFrame),
tables (summary, FID agreement, the table writer), claims (ODE error vs quality), plots, build (the job)."""
from __future__ import annotations

from pathlib import Path

from cmbench.report.outputs import report_outputs
from cmbench.report.papers import load_paper_numbers

__all__ = ["load_paper_numbers", "report", "report_outputs"]


def report(suite: str, files, tables: str | Path, plots: str | Path,
           paper_numbers: str | Path | None = None) -> list[Path]:
    """Tables and plots of a suite's metric records; returns `report_outputs(suite, tables, plots)`.
    paper_numbers: the reported-numbers file (default configs/paper_numbers.yaml, from the working directory,
    else the one beside the package); needed only when records of cifar10 / imagenet64 are present."""
    from cmbench.report.build import build

    return build(suite, files, tables, plots, paper_numbers)
