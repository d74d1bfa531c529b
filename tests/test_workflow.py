"""The Snakemake workflow end to end on a small toy suite: outputs, idempotence, targeted re-runs."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import REPO

SMALL = "train.steps=300 train.checkpoint_every=100 sample.n=2000 evaluate.ref_n=2000 evaluate.floor_repeats=2"
# a small suite: iCT, and ECT, which starts from a trained EDM teacher that is not itself in the suite
SUITE = {"variants": ["ict", "ect"], "datasets": ["gauss1d", "ring2d"], "seeds": [0, 1]}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    configs = workdir / "configs"
    if not configs.exists():
        shutil.copytree(REPO / "configs", configs)
        (configs / "experiment.yaml").write_text(yaml.safe_dump({"suites": {"mini": SUITE}}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "all", "--cores", "2", "-s", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--config", f"configs={configs}", "suite=mini", f"set={SMALL}", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def planned_jobs(dry_run_output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule → count."""
    table = dry_run_output.split("Job stats:")[1].split("Reasons:")[0] if "Job stats:" in dry_run_output else ""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("wf")
    snakemake(wd)
    return wd


def test_suite_writes_records_summary_and_plot(workdir):
    tables = workdir / "results" / "tables"
    df = pd.read_csv(tables / "records_mini.csv")
    assert set(df.variant) == {"ict", "ect"} and set(df.dataset) == {"gauss1d", "ring2d"}
    assert set(df.seed) == {0, 1} and set(df.nfe) == {1, 2}
    per_run = df.groupby(["dataset", "variant", "seed", "nfe"]).metric.apply(set)
    assert all(m == {"fd", "w2", "ode_error"} for m in per_run.loc["gauss1d"])
    assert all(m == {"fd", "sliced_w2", "near_mode_fraction", "mode_coverage_min", "ode_error"}
               for m in per_run.loc["ring2d"])
    assert df.value.notna().all() and (df.n_gen == 2000).all()
    assert df.config_hash.nunique() == 8 and df.checkpoint_sha256.nunique() == 8
    teacher = workdir / "results" / "runs" / "mini" / "ring2d" / "edm" / "s1" / "final.pt"
    assert teacher.exists() and "edm" not in set(df.variant)        # trained as a dependency, not reported
    summary = (tables / "summary_mini.md").read_text()
    assert "## gauss1d" in summary and "| ideal" in summary and "w2 @1" in summary
    assert (workdir / "results" / "plots" / "mini_metrics.png").stat().st_size > 10_000


def test_second_run_has_nothing_to_do(workdir):
    assert "Nothing to be done" in snakemake(workdir, "-n").stdout


def test_deleting_one_final_reruns_only_that_run(workdir):
    run = workdir / "results" / "runs" / "mini" / "ring2d" / "ict" / "s1"
    (run / "final.pt").unlink()
    assert planned_jobs(snakemake(workdir, "-n").stdout) == {"all": 1, "report": 1, "run": 1}
    other = workdir / "results" / "runs" / "mini" / "ring2d" / "ict" / "s0" / "metrics" / "nfe1-data.json"
    before = other.stat().st_mtime_ns
    snakemake(workdir)
    assert (run / "final.pt").exists() and other.stat().st_mtime_ns == before


def test_separate_stages_give_the_same_records(workdir, tmp_path):
    """The cluster path (train, sample, evaluate, collect as separate jobs) reproduces the fused laptop path."""
    snakemake(tmp_path, "fuse=False")
    fused = pd.read_csv(workdir / "results" / "tables" / "records_mini.csv")
    separate = pd.read_csv(tmp_path / "results" / "tables" / "records_mini.csv")
    cols = ["dataset", "variant", "seed", "nfe", "metric", "value", "config_hash", "checkpoint_sha256"]
    pd.testing.assert_frame_equal(fused[cols], separate[cols])


def test_a_yaml_edited_after_planning_leaves_the_planned_run_alone(tmp_path):
    """Before its first job the workflow writes every run's RUN/config.json, and every stage reads only that file: a
    job that starts after a YAML was edited (queued on a cluster, say) runs the config as planned. Only a new plan
    sees the edit; it re-runs the run, whose old checkpoints and stats are set aside under their config hash."""
    from cmbench import checkpoint
    run = tmp_path / "results" / "runs" / "mini" / "gauss1d" / "ict" / "s0"
    snakemake(tmp_path, "--until", "reference")          # plans (every config.json) and makes only the references
    planned = json.loads((run / "config.json").read_text())
    assert planned["config"]["optim"]["lr"] == 3e-4 and not (run / "final.pt").exists()
    variant = tmp_path / "configs" / "variants" / "ict.yaml"
    variant.write_text(variant.read_text() + "optim: {lr: 1.0e-3}\n")
    subprocess.run([sys.executable, "-m", "cmbench.cli", "launch", "train", "--run", str(run)], check=True,
                   capture_output=True)                  # the queued job starts after the edit
    final = checkpoint.load(run / "final.pt")
    assert final["config_hash"] == planned["hash"] and final["step"] == 300     # the planned run, not the edit
    assert json.loads((run / "config.json").read_text()) == planned
    # a new plan sees the edit and re-runs this run (its config_hash changed)
    snakemake(tmp_path, "--until", str(run.relative_to(tmp_path) / "final.pt"))
    replanned = json.loads((run / "config.json").read_text())
    assert replanned["hash"] != planned["hash"] and replanned["config"]["optim"]["lr"] == 1e-3
    assert checkpoint.load(run / "final.pt")["config_hash"] == replanned["hash"]
    assert "config changed" in (run / "logs" / "run.log").read_text()
    old = run / f"checkpoints-{planned['hash']}"
    assert {checkpoint.load(p)["config_hash"] for p in checkpoint.list_checkpoints(old)} == {planned["hash"]}
    assert (run / f"stats-{planned['hash']}.jsonl").exists()
