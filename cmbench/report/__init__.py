"""Collate metric records → tidy DataFrame → tables (CSV, Markdown, LaTeX) and seaborn plots. Never imports torch;
importing this package imports no pandas, matplotlib or seaborn either (the workflow calls `report_outputs` and
`load_paper_numbers` while Snakemake parses it): `report` imports them when called.

Sample pictures of one suite (module `pictures`, its own job, `python -m cmbench.report.pictures`, reading the
runs' sample files; names: `outputs.picture_files`, one pair per dataset of the suite):

    plots/{suite}_{dataset}_samples.png         variants × NFE: toy scatter over the exact Φ(x_T) of the same noise,
                                                1-D histograms over the exact density, or image grids (the same
                                                seeds in every panel) above a strip of training images
    plots/{suite}_{dataset}_samples.npz         its source: each panel's run, variant, NFE, sample file and seeds

Outputs of one suite (`report_outputs`, a pure function of the suite name, so Snakemake knows them up front):

    tables/records_{suite}.csv                 every record, tidy (intermediate checkpoints' too)
    tables/summary_{suite}.csv                 each run's last-step records summarised, tidy, full precision: per
                                                dataset, variant and metric [backend/mode] @ NFE, mean, sd, n,
                                                ideal, best-student flag, paper value, Δ and protocol flag
    tables/summary_{suite}.{md,tex}             per dataset, 3 significant digits: students × metric @ NFE (+ the
                                                `ideal` noise floor), best in bold, then the teacher's own table;
                                                FID columns of datasets with paper numbers get the paper value, Δ
                                                and a protocol-match flag beside them
    tables/ode_vs_quality_{suite}.{csv,md,tex}  ODE error vs sample quality per dataset, NFE and variant (toy data;
                                                images: runs with a trained teacher, at one step)
    tables/ode_vs_quality_verdicts_{suite}.csv  does "Direct CM: lower ODE error, worse samples than CD" hold here?
    tables/budget_{suite}.{csv,md,tex}          per dataset: every variant at the training-image counts that all
                                                of them were evaluated at (matched budget)
    tables/images_to_reach_{suite}.{csv,md,tex} training images and FLOPs each variant needed to reach the edm
                                                teacher's final value × 2 (÷ 2 where higher is better)
    plots/{suite}_metrics.png                   metric vs NFE per variant (last step; no re-noising ODE error)
    plots/{suite}_training.png                  training curves from each run's stats.jsonl
    plots/{suite}_fid_agreement.png             torch-fidelity vs clean-fid on the same samples
    plots/{suite}_ode_vs_quality.png            ODE error vs sample quality (CD and Direct CM highlighted)
    plots/{suite}_budget_{images,flops}.png     metric vs training images / FLOPs per variant, seeds as bands

Modules: outputs (the file names), papers (configs/paper_numbers.yaml, validated), records (records → DataFrame),
tables (summary, FID agreement, the table writer), claims (ODE error vs quality), budget (quality against training
budget), plots, build (the job)."""
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
