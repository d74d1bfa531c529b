"""The report: reported numbers (configs/paper_numbers.yaml), summary tables, ODE-error-vs-quality verdicts, plots.

Golden files: tests/golden/{summary,ode_vs_quality,ode_vs_quality_verdicts}_golden.* are the tables that
`cmbench.report.build.write_tables` renders from the hand-written fixture records in tests/golden/records/ (a toy
dataset with ideal values; cifar10 FID from torch-fidelity and clean-fid at NFE 1 and 2 over 2 seeds; `cd` has a
paper number, `direct_cm` has none and lacks NFE 2) and configs/paper_numbers.yaml. They are compared byte for
byte. After an intended change of the tables (or of the paper numbers they show), regenerate them with
`python tests/regen_golden.py` and review `git diff tests/golden` before committing."""
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import yaml
from regen_golden import FIXTURES, GOLDEN, PAPER_NUMBERS, TABLES, render

from cmbench.cli import main
from cmbench.config import ConfigError
from cmbench.metrics.keys import ODE_ERROR
from cmbench.report import papers as paper_numbers
from cmbench.report import build, plots, records, report, report_outputs, tables
from cmbench.report.claims import DIRECT_CM_VS_CD, ode_vs_quality, write_ode_vs_quality
from cmbench.report.papers import PROTOCOL_REQUIRED, STATUSES, load_paper_numbers, primary_numbers

# Every number of papers.md §10 as (dataset, NFE, value): §10.1 CIFAR-10 (31), §10.2 ImageNet-64 (45).
SECTION_10 = {
    "§10.1": [("cifar10", n, v) for n, v in [
        (35, 1.97), (35, 1.79), (35, 2.01), (35, 2.04), (35, 2.15),        # EDM, EDM cond., as cited, TrigFlow
        (1, 3.55), (2, 2.93), (1, 8.70), (2, 5.83), (1, 8.34), (2, 5.58),  # CD, CT, PD
        (1, 2.83), (2, 2.46), (1, 2.51), (2, 2.24), (1, 2.62), (2, 2.28),  # iCT, iCT-deep, initial submission
        (1, 4.54), (2, 2.20), (1, 3.86), (2, 2.15), (1, 3.60), (2, 2.11), (2, 2.73),   # ECT 100k/200k/400k, 1 h
        (1, 2.85), (2, 2.06), (1, 3.97), (1, 3.51), (1, 3.09), (1, 3.66), (2, 2.52)]],  # sCT, in ECT setting, sCD
    "§10.2": [("imagenet64", n, v) for n, v in [
        (511, 1.36), (79, 2.44), (63, 1.33), (63, 1.70), (63, 1.55), (63, 1.44), (63, 1.38),  # EDM, EDM2, TrigFlow
        (1, 6.20), (2, 4.70), (3, 4.32), (1, 13.0), (2, 11.1),                                # CD, CT
        (1, 4.02), (2, 3.20), (1, 3.25), (2, 2.77), (1, 3.91), (2, 3.64),                     # iCT family
        (1, 2.49), (2, 1.67), (1, 5.51), (1, 3.67), (1, 3.35), (2, 3.18), (2, 2.35), (2, 1.96), (1, 4.05),  # ECT
        (1, 3.20), (2, 1.90),                                                                 # MultiStep-CD
        (1, 3.23), (1, 2.25), (1, 2.08), (1, 2.04), (2, 2.93), (2, 1.81), (2, 1.57), (2, 1.48),  # sCT S–XL
        (1, 2.97), (1, 2.79), (1, 2.43), (1, 2.44), (2, 2.07), (2, 1.89), (2, 1.70), (2, 1.66)]],  # sCD S–XL
}


@pytest.fixture(scope="module")
def papers():
    return load_paper_numbers(PAPER_NUMBERS)


@pytest.fixture(scope="module")
def golden_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden")
    render(out)
    return out


# ------------------------------------------------------------------------------------------------ paper numbers
def test_paper_numbers_hold_every_section_10_number(papers):
    for section, expected in SECTION_10.items():
        got = [e for e in papers if e["source"] == section]
        assert len(got) == len(expected) == {"§10.1": 31, "§10.2": 45}[section]
        assert Counter((e["dataset"], e["nfe"], round(e["value"], 2)) for e in got) == Counter(expected)
    assert {e["status"] for e in papers} == set(STATUSES) and all(e["metric"] for e in papers)
    # the headline choices documented in the file
    prim = primary_numbers(papers)
    assert prim[("cifar10", "edm", "fid", 35)]["value"] == 1.97
    assert (prim[("cifar10", "cd", "fid", 1)]["value"], prim[("cifar10", "cd", "fid", 2)]["value"]) == (3.55, 2.93)
    assert prim[("imagenet64", "sct", "fid", 1)]["model"] == "XL"
    assert not any(e["primary"] for e in papers if e["variant"] is None)
    for e in papers:
        assert e["citation"] and e["budget"] and set(PROTOCOL_REQUIRED) <= set(e["protocol"])


def test_the_workflow_loads_the_paper_numbers_without_pandas():
    """The workflow calls report_outputs and load_paper_numbers while Snakemake parses it: plain data, and none of
    pandas, matplotlib or seaborn imported."""
    code = (f"import sys; from cmbench.report import load_paper_numbers, report_outputs; "
            f"e = load_paper_numbers({str(PAPER_NUMBERS)!r}); report_outputs('toy', 't', 'p'); "
            f"assert isinstance(e, list) and isinstance(e[0], dict); "
            f"heavy = {{'pandas', 'matplotlib', 'seaborn'}} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def _bad_file(tmp_path, edit) -> Path:
    data = yaml.safe_load(PAPER_NUMBERS.read_text())
    edit(data)
    (tmp_path / "variants").mkdir()
    for v in PAPER_NUMBERS.parent.joinpath("variants").glob("*.yaml"):   # the repo's variants, by name
        (tmp_path / "variants" / v.name).write_text("{}\n")
    path = tmp_path / "paper_numbers.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def _entry(data, method, nfe, **match):
    return next(e for e in data["entries"] if e["method"] == method and e["nfe"] == nfe
                and all(e.get(k) == v for k, v in match.items()))


@pytest.mark.parametrize("edit, message", [
    (lambda d: _entry(d, "sCD", 1, dataset="cifar10").pop("status"), r"entries\[\d+\] .*missing field\(s\) status"),
    (lambda d: _entry(d, "sCD", 1, dataset="cifar10").update(status="confirmd"), r"status 'confirmd' is not one of"),
    (lambda d: _entry(d, "EDM as cited by sCM / ECT", 35).update(primary=True),
     r"cifar10/edm fid NFE 35: duplicate primary"),
    (lambda d: _entry(d, "sCD", 2, dataset="cifar10").update(primary=False), r"cifar10/scd fid NFE 2: no primary"),
    (lambda d: _entry(d, "PD (ℓ2)", 1).update(primary=True), r"primary: true needs a variant"),
    (lambda d: _entry(d, "sCD", 1, dataset="cifar10").update(variant="scdd"), r"unknown variant 'scdd'"),
    (lambda d: _entry(d, "sCD", 1, dataset="cifar10").update(protocol="scm"), r"unknown protocol 'scm'"),
    (lambda d: _entry(d, "sCD", 1, dataset="cifar10").update(dataset="cifar100"), r"dataset 'cifar100' is not"),
    (lambda d: _entry(d, "sCD", 1, dataset="cifar10").update(value="3.66"), r"value must be a non-negative number"),
    (lambda d: _entry(d, "sCD", 1, dataset="cifar10").update(colour="red"), r"unknown field\(s\) colour"),
    (lambda d: d["protocols"]["cm_cifar10"].pop("n_samples"), r"protocols.cm_cifar10: missing field\(s\) n_samples"),
    (lambda d: d["entries"].append(dict(d["entries"][0])), r"entries\[\d+\] duplicates entries\[0\]"),
])
def test_paper_numbers_loader_rejects_a_bad_entry_in_one_line(tmp_path, edit, message):
    path = _bad_file(tmp_path, edit)
    with pytest.raises(ConfigError, match=message) as e:
        load_paper_numbers(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_the_unedited_copy_loads(tmp_path):
    assert len(load_paper_numbers(_bad_file(tmp_path, lambda d: None))) > 76


# ------------------------------------------------------------------------------------------------------- tables
@pytest.mark.parametrize("name", TABLES)
def test_golden(golden_dir, name):
    got = (golden_dir / name).read_bytes()
    assert got == (GOLDEN / name).read_bytes(), f"{name} differs from tests/golden (see this file's docstring)"


@pytest.mark.parametrize("name", TABLES + ["records_golden.csv"])
def test_no_blank_cells(golden_dir, name):
    text = (golden_dir / name).read_text()
    assert not re.search(r"\bnan\b|\bNaN\b|\bNone\b", text)
    if name.endswith(".csv"):
        df = pd.read_csv(golden_dir / name, keep_default_na=False, dtype=str)
        assert len(df.columns) and not (df == "").any().any(), name
    elif name.endswith(".md"):
        assert not re.search(r"\|[ \t]*\|", text)
    else:
        assert not re.search(r"&[ \t]*&|&[ \t]*\\\\|^[ \t]*&", text, re.MULTILINE)


def _summary_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).set_index(["dataset", "variant", "column"])


def md_tables(path: Path) -> dict[tuple[str, str], pd.DataFrame]:
    """The pipe tables of a summary Markdown file, as strings: (dataset, the line above the table) → table."""
    out, dataset, above, rows = {}, None, None, []
    for line in path.read_text().splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"[|:\- ]+", line):
                rows.append([c.strip() for c in line.strip("|").split(" | ")])
            continue
        if rows:
            out[(dataset, above)] = pd.DataFrame(rows[1:], columns=rows[0]).set_index(rows[0][0])
            rows = []
        if line.startswith("## "):
            dataset = line[3:]
        elif line:
            above = line
    return out


def _md_table(tabs: dict, dataset: str, role: str) -> pd.DataFrame:
    (t,) = [t for (ds, above), t in tabs.items() if ds == dataset and above.startswith(role)]
    return t


def test_summary_csv_keeps_full_precision_and_the_paper_comparison(golden_dir):
    raw = records.load_records(FIXTURES)
    s = _summary_csv(golden_dir / "summary_golden.csv")
    cd = s.loc[("cifar10", "cd", "fid [torch-fidelity] @1")]
    values = raw.query("dataset == 'cifar10' and variant == 'cd' and nfe == 1 and backend == 'torch-fidelity'")
    assert cd["mean"] == values["value"].mean() and cd["sd"] == values["value"].std() and cd["n"] == 2
    assert (cd["paper"], cd["paper_status"], cd["protocol"]) == (3.55, "confirmed", "✓")
    assert cd["paper_delta"] == pytest.approx(values["value"].mean() - 3.55, abs=1e-12)
    assert s.loc[("cifar10", "cd", "fid [clean-fid/legacy_tensorflow] @2"), "protocol"] == "✗ 5k samples vs 50k"
    assert pd.isna(s.loc[("cifar10", "direct_cm", "fid [torch-fidelity] @1"), "paper"])
    assert ("cifar10", "direct_cm", "fid [torch-fidelity] @2") not in s.index             # not evaluated: no row
    edm = s.loc[("gauss1d", "edm", "w2 @35")]
    assert (edm["role"], edm["n"], edm["mean"], edm["ideal"]) == ("teacher", 1, 0.0195, 0.0056) and pd.isna(edm["sd"])
    assert pd.isna(s.loc[("gauss1d", "cd", "ode_error @2"), "ideal"])
    md = (golden_dir / "summary_golden.md").read_text()
    assert "max relative difference 0.33% over 6 sample sets" in md
    cells = _md_table(md_tables(golden_dir / "summary_golden.md"), "cifar10", "Students").loc["cd"]
    assert (cells["fid [torch-fidelity] @1: paper"], cells["fid [torch-fidelity] @1: Δ"]) == ("3.55", "+0.130")
    assert cells["fid [clean-fid/legacy_tensorflow] @2: protocol"] == "✗ 5k samples vs 50k"


def _significant(number: str) -> int:
    return len(number.lstrip("+-").split("e")[0].replace(".", "").lstrip("0"))


def test_summary_markdown_shows_3_significant_digits_and_n_once(golden_dir):
    """Every number of the headline tables: the mean (or ideal) to 3 significant digits of the CSV's full-precision
    value, the sd to at most 2; n stated once, above each table, and in no cell (every n is the same here)."""
    tabs, s = md_tables(golden_dir / "summary_golden.md"), _summary_csv(golden_dir / "summary_golden.csv")
    checked = 0
    for (dataset, above), t in tabs.items():
        assert above.count("n=") == 1 and "(n=" not in "".join(t.to_numpy().ravel())
        for col in (c for c in t.columns if ": " not in c):                          # not paper, Δ, protocol
            for variant, cell in t[col].items():
                m = re.fullmatch(r"\**(?P<mean>[-+.e\d]+)(?: ± (?P<sd>[-+.e\d]+))?\**", cell)
                if m is None:
                    assert cell in ("not evaluated", "n/a"), cell
                    continue
                column = s.loc[dataset].xs(col, level="column")
                exact = column["ideal"].iloc[0] if variant == "ideal" else column.loc[variant, "mean"]
                assert float(m["mean"]) == pytest.approx(exact, rel=5e-3, abs=0), (col, variant)
                assert _significant(m["mean"]) == 3 or exact == 0, cell
                assert m["sd"] is None or _significant(m["sd"]) <= 2, cell
                checked += 1
    assert checked == 6 + 3 * 5 + 2 * 3          # cifar10 (2 not evaluated), gauss1d students and ideal, teacher
    assert [above.split(": ", 1)[1] for _, above in tabs] == (
        ["mean ± sd over n=2 training seeds; the best per column in bold."] * 2 + ["n=1 training seed (no sd)."])


def _records(values: dict, metric: str, nfe: int = 1, sampler: str = "consistency") -> list[dict]:
    """Toy records of one metric: {variant: [value per seed]}."""
    return [{"suite": "t", "dataset": "ring2d", "variant": v, "seed": s, "nfe": nfe, "metric": metric,
             "backend": "cmbench-toy", "mode": "exact ground truth", "value": x, "ideal": 0.5, "n_gen": 100,
             "sampler": sampler} for v, xs in values.items() for s, x in enumerate(xs)]


def test_best_student_is_marked_in_each_metrics_direction_and_a_different_n_is_stated(tmp_path):
    df = pd.DataFrame(_records({"cd": [0.2, 0.3], "ict": [0.6, 0.7], "ect": [0.5]}, "near_mode_fraction")
                      + _records({"cd": [0.02, 0.03], "ict": [0.05, 0.06], "ect": [0.01]}, "sliced_w2")
                      + _records({"edm": [0.9, 0.9]}, "near_mode_fraction", nfe=35, sampler="heun")
                      + _records({"edm": [0.001, 0.001]}, "sliced_w2", nfe=35, sampler="heun"))
    tables.write_summary(df, "t", {}, tmp_path)
    s = _summary_csv(tmp_path / "summary_t.csv")
    assert sorted(s.index[s["best"]]) == [("ring2d", "ect", "sliced_w2 @1"), ("ring2d", "ict", "near_mode_fraction @1")]
    tabs = md_tables(tmp_path / "summary_t.md")
    students = _md_table(tabs, "ring2d", "Students")
    assert students.loc["ict", "near_mode_fraction @1"] == "**0.650 ± 0.071**"       # higher is better
    assert students.loc["ect", "sliced_w2 @1"] == "**0.0100 (n=1)**"                  # lower is better; its own n
    assert students.loc["cd", "sliced_w2 @1"] == "0.0250 ± 0.0071"
    assert list(students.index) == ["cd", "ect", "ict", "ideal"]                       # the teacher apart
    assert "**" not in "".join(_md_table(tabs, "ring2d", "Teacher").to_numpy().ravel())   # the best of students only


def test_teacher_nfe_and_renoised_ode_error_stay_out_of_the_students_table(golden_dir):
    tabs = md_tables(golden_dir / "summary_golden.md")
    students, teacher = _md_table(tabs, "gauss1d", "Students"), _md_table(tabs, "gauss1d", "Teacher")
    assert list(students.columns) == ["w2 @1", "w2 @2", "fd @1", "fd @2", "ode_error @1"]
    assert list(teacher.columns) == ["w2 @35", "fd @35", "ode_error @35"] and list(teacher.index) == ["edm", "ideal"]
    s = _summary_csv(golden_dir / "summary_golden.csv")                     # the 2-step ODE error: CSV only
    assert s.index[~s["headline"]].tolist() == [("gauss1d", v, "ode_error @2") for v in ("cd", "direct_cm")]
    assert "ode_error @2" not in (golden_dir / "summary_golden.tex").read_text()
    plotted = plots.metric_points(records.load_records(FIXTURES))
    assert sorted(set(plotted.loc[plotted["metric"] == ODE_ERROR, "nfe"])) == [1, 35]
    assert len(plotted) == len(records.load_records(FIXTURES)) - 4                 # 2 variants × 2 seeds left out


def test_an_earlier_checkpoint_leaves_the_summary_alone(tmp_path):
    """Records at an intermediate step (with other values) are in records_{suite}.csv, but not in what summarises
    a run: the summary, the ODE-vs-quality study and the metrics plot."""
    final = records.load_records(FIXTURES).assign(step=400)
    df = pd.concat([final, final.assign(step=200, value=final["value"] * 10 + 1)], ignore_index=True)
    build.write_tables(df, "golden", tmp_path, primary_numbers(load_paper_numbers(PAPER_NUMBERS)))
    for name in TABLES:
        assert (tmp_path / name).read_bytes() == (GOLDEN / name).read_bytes(), name
    assert len(pd.read_csv(tmp_path / "records_golden.csv")) == 2 * len(final)
    pd.testing.assert_frame_equal(plots.metric_points(df).drop(columns="step"),
                                  plots.metric_points(records.load_records(FIXTURES)))


def test_records_of_two_suites_both_survive(tmp_path):
    papers, df = primary_numbers(load_paper_numbers(PAPER_NUMBERS)), records.load_records(FIXTURES)
    build.write_tables(df[df["dataset"] == "gauss1d"], "toy", tmp_path, papers)
    build.write_tables(df[df["dataset"] == "cifar10"], "cifar10", tmp_path, papers)
    assert set(pd.read_csv(tmp_path / "records_toy.csv")["dataset"]) == {"gauss1d"}
    assert set(pd.read_csv(tmp_path / "records_cifar10.csv")["dataset"]) == {"cifar10"}


def test_protocol_flag_names_each_difference():
    df = records.with_keys(records.load_records(FIXTURES).query("dataset == 'cifar10'"))
    edm = {"protocol": {"n_samples": 50000, "features": "inception_tf", "reference_split": "train",
                        "conditional": False, "aggregate": "min over 3 sample sets"}}
    r = df[(df["variant"] == "cd") & (df["nfe"] == 1) & (df["backend"] == "torch-fidelity")]
    assert tables.protocol_flag(r, edm) == "✗ paper: min over 3 sample sets, ours: mean over seeds"
    clean = r.assign(backend="clean-fid", mode="clean", reference_split=None, conditional=True)
    assert tables.protocol_flag(clean, {"protocol": {**edm["protocol"], "aggregate": None}}) == (
        "✗ clean-fid clean Inception vs TF Inception; ✗ conditional vs unconditional; "
        "? our reference split not recorded")
    unknown = {"protocol": {"n_samples": None, "features": None, "reference_split": None, "conditional": False}}
    assert tables.protocol_flag(r, unknown) == "? paper protocol not stated"


# -------------------------------------------------------------------------------------------- ODE vs quality
def _toy(ode: dict, quality: dict, nfe=1, metric="w2", dataset="gauss1d") -> pd.DataFrame:
    """Records of cd and direct_cm: {variant: [value per seed]} for ode_error and the quality metric."""
    rows = [{"suite": "t", "dataset": dataset, "variant": v, "seed": s, "nfe": nfe, "metric": m, "backend": "toy",
             "mode": "", "value": x, "ideal": None, "n_gen": 100}
            for m, per in ((ODE_ERROR, ode), (metric, quality)) for v, xs in per.items() for s, x in enumerate(xs)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("ode, quality, outcome, words", [
    ({"cd": [0.30, 0.32], "direct_cm": [0.10, 0.11]}, {"cd": [0.010, 0.011], "direct_cm": [0.05, 0.06]},
     "holds", "lower ODE error but worse w2"),
    ({"cd": [0.30, 0.32], "direct_cm": [0.10, 0.11]}, {"cd": [0.05, 0.06], "direct_cm": [0.010, 0.011]},
     "does not hold", "Direct CM has lower ODE error and better w2"),
    ({"cd": [0.10, 0.11], "direct_cm": [0.30, 0.32]}, {"cd": [0.010, 0.011], "direct_cm": [0.05, 0.06]},
     "does not hold", "Direct CM has higher ODE error and worse w2"),
    ({"cd": [0.30, 0.32], "direct_cm": [0.10, 0.11]}, {"cd": [0.010, 0.05], "direct_cm": [0.02, 0.06]},
     "inconclusive", "w2 difference within seed spread"),
    ({"cd": [0.30, 0.10], "direct_cm": [0.20, 0.21]}, {"cd": [0.010, 0.05], "direct_cm": [0.02, 0.06]},
     "inconclusive", "ODE-error and w2 difference within seed spread"),
    ({"cd": [0.30], "direct_cm": [0.10]}, {"cd": [0.010], "direct_cm": [0.05]},
     "inconclusive", "fewer than two seeds"),
    ({"cd": [0.30, 0.32]}, {"cd": [0.010, 0.011]}, "not evaluated", "no Direct CM records"),
])
def test_ode_vs_quality_verdict(ode, quality, outcome, words):
    table, verdicts = ode_vs_quality(_toy(ode, quality), DIRECT_CM_VS_CD)
    assert len(verdicts) == 1
    v = verdicts.iloc[0]
    assert (v["dataset"], v["nfe"], v["quality_metric"], v["outcome"]) == ("gauss1d", 1, "w2", outcome)
    assert v["verdict"].startswith(outcome) and words in v["verdict"], v["verdict"]
    assert set(table["variant"]) == set(ode)


def test_ode_vs_quality_uses_fd_and_sliced_w2_on_mixtures_and_skips_other_nfe():
    df = pd.concat([_toy({"cd": [1, 1.1], "direct_cm": [0.5, 0.6]}, {"cd": [1, 1.1], "direct_cm": [2, 2.1]},
                         metric=m, dataset="ring2d", nfe=n) for m in ("fd", "sliced_w2") for n in (1, 35)])
    table, verdicts = ode_vs_quality(df, DIRECT_CM_VS_CD)
    assert list(zip(verdicts["quality_metric"], verdicts["outcome"])) == [("fd", "holds"), ("sliced_w2", "holds")]
    assert set(table["NFE"]) == {1}


def test_no_ode_records_gives_empty_tables_not_blank_ones(tmp_path):
    fid_only = records.load_records(FIXTURES).query("dataset == 'cifar10'")
    paths = write_ode_vs_quality(fid_only, "img", tmp_path, DIRECT_CM_VS_CD)
    assert "No ode_error records" in (tmp_path / "ode_vs_quality_img.md").read_text()
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)


# -------------------------------------------------------------------------------------------- outputs and plots
def test_report_outputs_depend_only_on_names():
    out = report_outputs("toy", "results/tables", "results/plots")
    assert [str(p) for p in out] == [
        "results/tables/records_toy.csv", "results/tables/summary_toy.csv", "results/tables/summary_toy.md",
        "results/tables/summary_toy.tex", "results/tables/ode_vs_quality_toy.csv",
        "results/tables/ode_vs_quality_toy.md", "results/tables/ode_vs_quality_toy.tex",
        "results/tables/ode_vs_quality_verdicts_toy.csv", "results/tables/budget_toy.csv",
        "results/tables/budget_toy.md", "results/tables/budget_toy.tex", "results/tables/images_to_reach_toy.csv",
        "results/tables/images_to_reach_toy.md", "results/tables/images_to_reach_toy.tex",
        "results/plots/toy_metrics.png", "results/plots/toy_training.png", "results/plots/toy_fid_agreement.png",
        "results/plots/toy_ode_vs_quality.png", "results/plots/toy_budget_images.png",
        "results/plots/toy_budget_flops.png"]


def _run_layout(root: Path) -> list[Path]:
    """The fixture records as run dirs (runs/{suite}/{dataset}/{variant}/s{seed}/metrics/records.json), each with
    a short stats.jsonl."""
    files = []
    for r in (r for f in FIXTURES for r in json.loads(f.read_text())):
        run = root / "runs" / r["suite"] / r["dataset"] / r["variant"] / f"s{r['seed']}"
        f = run / "metrics" / "records.json"
        if not f.exists():
            f.parent.mkdir(parents=True)
            f.write_text("[]")
            (run / "stats.jsonl").write_text("".join(
                json.dumps({"step": s, "loss": 1 / (s + 1) - 0.01 * r["seed"], "grad_norm": 0.1 + s / 100,
                            "lr": 3e-4, "sec_per_kstep": 3.0}) + "\n" for s in range(0, 500, 50)))
            files.append(f)
        f.write_text(json.dumps(json.loads(f.read_text()) + [r]))
    return files


def test_report_writes_every_output_with_plots(tmp_path, capsys):
    files = _run_layout(tmp_path / "results")
    tables_dir, plots_dir = tmp_path / "results" / "tables", tmp_path / "results" / "plots"
    main(["report", "--suite", "golden", "--records", *map(str, files), "--tables", str(tables_dir),
          "--plots", str(plots_dir), "--paper-numbers", str(PAPER_NUMBERS)])
    out = report_outputs("golden", tables_dir, plots_dir)
    assert capsys.readouterr().out.split() == [str(p) for p in out]          # what it wrote, in that order
    assert all(p.exists() and p.stat().st_size > 0 for p in out)
    assert all(p.stat().st_size > 10_000 for p in out         # real figures, not placeholders (the fixture records
               if p.suffix == ".png" and "budget" not in p.name)   # carry no training budget: test_budget_report)
    assert not list((tmp_path / "results").rglob(".*tmp*"))                   # atomic writes left no temp file
    assert len(records.training_curves(records.load_records(files))) == len(files) * 10 * 2
    for name in TABLES:                                   # the same tables as from the flat fixture files
        assert (tables_dir / name).read_bytes() == (GOLDEN / name).read_bytes()


def test_placeholder_plots_when_there_is_nothing_to_show(tmp_path):
    toy = records.load_records(FIXTURES).query("dataset == 'gauss1d'")
    plots.plot_fid_agreement(toy, tmp_path / "fid.png")
    plots.plot_training(toy, tmp_path / "training.png")        # the flat fixture files have no stats.jsonl
    plots.plot_ode_vs_quality(records.load_records(FIXTURES).query("dataset == 'cifar10'"), tmp_path / "ode.png",
                              DIRECT_CM_VS_CD)
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("fid.png", "training.png", "ode.png"))


def test_paper_datasets_need_the_paper_numbers_file(tmp_path, monkeypatch):
    monkeypatch.setattr(paper_numbers, "default_paper_numbers", lambda: None)
    with pytest.raises(ConfigError, match="paper_numbers.yaml not found"):
        report("golden", FIXTURES, tmp_path / "t", tmp_path / "p")
