"""`snakemake --report` end to end: a small `toy` suite with both studies (the theory study and ODE error vs
quality), its tables without blank cells, the HTML report, and that report rendered by headless Chromium.

Snakemake's HTML report is a single file holding a React app: every result is embedded as a base64 data URI
in `<script id="results">` (with its caption, already rendered to HTML), and the page shows the workflow
description (report/workflow.rst, whose contents list names every result) until an entry is selected. So the
test checks (1) the embedded data against the files on disk, (2) the DOM Chromium renders on opening the
file, and (3) the DOM after selecting the summary table, which prints it as an HTML table in its caption.

Everything but the browser step runs without Chromium; that step is skipped where Chromium is absent, unless
CMBENCH_REQUIRE_CHROMIUM=1 (CI sets it and installs Debian's chromium, so there it must run)."""
import base64
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO

SMALL = "train.steps=60 sample.n=500 evaluate.ref_n=500 evaluate.floor_repeats=2"
# the real suite name: the theory study and the ODE-vs-quality study are made for suite `toy`; CD and
# Direct CM are the pair the ODE-vs-quality study compares, two seeds give it a spread
SUITE = {"variants": ["cd", "direct_cm", "ict"], "datasets": ["gauss1d", "ring2d"], "seeds": [0, 1]}
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)

TABLES = ["tables/summary_toy.csv", "tables/records_toy.csv", "tables/ode_vs_quality_toy.csv",
          "tables/ode_vs_quality_verdicts_toy.csv", "studies/theory/theory.csv",
          "studies/theory/theory_slopes.csv"]
PLOTS = ["plots/toy_metrics.png", "plots/toy_training.png", "plots/toy_fid_agreement.png",
         "plots/toy_ode_vs_quality.png", "studies/theory/theory.png"]
BUDGET = ["tables/budget_toy.csv", "tables/images_to_reach_toy.csv", "plots/toy_budget_images.png",
          "plots/toy_budget_flops.png"]                   # quality against training budget
SHOWN = [f"results/{f}" for f in TABLES + PLOTS + BUDGET]  # what the report holds (the Snakefile's SHOWN)
# tables a reader reads: no cell may be blank or NaN
READ = ["tables/summary_toy.csv", "tables/summary_toy.md", "tables/ode_vs_quality_toy.csv",
        "tables/ode_vs_quality_toy.md", "tables/ode_vs_quality_verdicts_toy.csv",
        "studies/theory/theory_summary.md"]
NAN = re.compile(r"\bnan\b|^\s*None\s*$", re.I)
# the sample pictures (cmbench.report.pictures): in the report too
PICTURES = ["plots/toy_gauss1d_samples.png", "plots/toy_ring2d_samples.png"]
SHOWN += [f"results/{f}" for f in PICTURES]


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", *args, "--cores", "2", "-s", str(REPO / "Snakefile"), "--directory",
           str(workdir), "--config", f"configs={workdir / 'configs'}", "suite=toy", f"set={SMALL}"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def blank_cells(path: Path) -> list[str]:
    """Cells of a CSV file or of the pipe tables of a Markdown file that are empty or NaN, as 'row:col'."""
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.reader(f))
        assert len(rows) > 1, f"{path.name}: no rows"
    else:
        rows = [line.strip().strip("|").split("|") for line in path.read_text().splitlines()
                if line.startswith("|") and not re.fullmatch(r"[|:\- ]+", line.strip())]
        assert rows, f"{path.name}: no table"
    return [f"{path.name} {i}:{j} {c!r}" for i, row in enumerate(rows) for j, c in enumerate(row)
            if not c.strip() or NAN.search(c)]


def chromium_dom(html: Path, profile: Path) -> str:
    """The DOM of a file:// page after its scripts ran, as headless Chromium serialises it."""
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
           "--virtual-time-budget=10000", "--dump-dom", html.as_uri()]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "</html>" in r.stdout, r.stderr[-3000:]
    return r.stdout


def rendered(dom: str) -> str:
    """What the report's React app rendered (the #app element; the scripts with the data come after it)."""
    start = dom.index('<div id="app">')
    return dom[start:dom.index("<script", start)]


def cells(html: str) -> set[str]:
    """The texts of the table cells in a piece of HTML."""
    return {unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", html, re.S)}


def embedded_results(html: str) -> dict:
    """The report's result table: path → {name, caption, mime_type, data_uri, ...}."""
    start = html.index("var results = ", html.index('<script id="results">')) + len("var results = ")
    return json.JSONDecoder().raw_decode(html, start)[0]


def test_html_report(tmp_path):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    (tmp_path / "configs" / "experiment.yaml").write_text(yaml.safe_dump({"suites": {"toy": SUITE}}))
    snakemake(tmp_path, "all")
    results = tmp_path / "results"

    # both studies' tables and plots; real plots, not the placeholder of a study with nothing to show
    for f in TABLES + PLOTS + BUDGET + ["studies/theory/theory_summary.md", "studies/theory/theory_summary.tex",
                               "tables/ode_vs_quality_toy.md", "tables/ode_vs_quality_toy.tex"]:
        assert (results / f).stat().st_size > 0, f
    for f in PLOTS[:2] + PLOTS[3:]:
        assert (results / f).stat().st_size > 20_000, f"{f}: a placeholder?"
    with (results / "tables/ode_vs_quality_verdicts_toy.csv").open(newline="") as f:
        verdicts = list(csv.DictReader(f))
    assert {(v["dataset"], v["nfe"]) for v in verdicts} >= {("gauss1d", "1"), ("ring2d", "1")}
    for dataset in ("gauss1d", "ring2d"):      # each picture's source: every variant at NFE 1 and 2, the same seeds
        assert (results / f"plots/toy_{dataset}_samples.png").stat().st_size > 20_000, dataset
        src = np.load(results / f"plots/toy_{dataset}_samples.npz")
        assert sorted(zip(src["variant"], src["nfe"])) == [(v, n) for v in SUITE["variants"] for n in (1, 2)]
        assert all(np.array_equal(row, np.arange(len(row))) for row in src["seeds"])
    blanks = [c for f in READ for c in blank_cells(results / f)]
    assert not blanks, blanks

    # the report: made from the finished run, running nothing
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()}
    report = tmp_path / "report.html"
    snakemake(tmp_path, "--report", str(report))
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*") if p.is_file()} == before
    html = report.read_text()

    # every table and plot is embedded byte for byte, under its own name and with its caption
    entries = embedded_results(html)
    assert set(entries) == set(SHOWN)
    for path, e in entries.items():
        assert e["name"] == Path(path).name and e["caption"].strip(), path
        assert base64.b64decode(e["data_uri"].split("base64,", 1)[1]) == (tmp_path / path).read_bytes(), path
    summary = entries["results/tables/summary_toy.csv"]["caption"]     # the table, printed in its caption
    assert {"gauss1d", "ring2d", "cd", "direct_cm", "ict", "ideal", "w2 @1", "sliced_w2 @2"} <= cells(summary)

    if CHROMIUM is None:
        if os.environ.get("CMBENCH_REQUIRE_CHROMIUM") == "1":
            pytest.fail("CMBENCH_REQUIRE_CHROMIUM=1 but no chromium on PATH (apt-get install chromium)")
        pytest.skip("the report's tables and plots are checked, but no chromium on PATH renders it "
                    "(apt-get install chromium; CMBENCH_REQUIRE_CHROMIUM=1 makes this a failure)")

    # opened: the app shows the workflow description, whose contents list names every table and plot
    page = rendered(chromium_dom(report, tmp_path / "chromium"))
    assert "cmbench: consistency models under one protocol" in page
    assert all(f"{Path(p).name}</a>" in page for p in SHOWN), page[-3000:]
    assert all(c in page for c in ("Benchmark (toy suite)", "ODE error vs quality", "Theory study",
                                   "Samples (toy suite)"))

    # the summary table selected (app.showResultInfo: what the caption links call): rendered as a table
    path = "results/tables/summary_toy.csv"
    selected = tmp_path / "selected.html"
    head, tail = html.rsplit("</body>", 1)
    selected.write_text(f"{head}<script>window.addEventListener('load', () => setTimeout(() => "
                        f"app.showResultInfo({json.dumps(path)}), 100));</script></body>{tail}")
    page = rendered(chromium_dom(selected, tmp_path / "chromium"))
    assert {"gauss1d", "ring2d", "cd", "direct_cm", "ict", "ideal", "w2 @1", "fd @2", "sliced_w2 @1",
            "ode_error @2"} <= cells(page[page.index("<table"):page.index("</table>")])
