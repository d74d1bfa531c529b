"""Image suites through the harness: sharded sampling, the digits suite end to end, FID records, dry-run errors
(the paper suites: test_paper_suites.py)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cmbench import paths
from cmbench.config import Experiment, parse_overrides
from cmbench.sample import merge_shards, sample_run
from cmbench.train import loop
from cmbench.checks import check_run
from conftest import REPO


def run_snakemake(*args: str, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run([sys.executable, "-m", "snakemake", "all", *args], capture_output=True, text=True,
                          cwd=cwd, env=env)


def test_sharded_sampling_equals_one_task(tmp_path):
    """Every image depends only on its own seed: three shards merged give the one-task file bit for bit."""
    cfg = check_run(Experiment(REPO / "configs").resolve(
        "digits", "digits", "ict", 0, parse_overrides(["train.steps=3", "sample.n=50", "sample.batch=16"])))
    rdir = paths.run_dir(tmp_path, cfg.run)
    loop.train(cfg, rdir, progress=False)
    whole = dict(np.load(sample_run(rdir, 2, tmp_path / "whole.npz")))
    for shard in range(3):
        sample_run(rdir, 2, shard=shard, shards=3)
    merged = np.load(merge_shards(rdir, 2, 3))
    assert whole["images"].dtype == np.uint8 and whole["images"].shape == (50, 8, 8, 1)
    assert set(merged.files) == set(whole) and not list((rdir / "samples").glob("*shard*"))
    for k in whole:
        assert np.array_equal(merged[k], whole[k]), k


@pytest.mark.slow
def test_digits_suite_end_to_end(tmp_path):
    """The digits suite (EDM teacher, iCT, CD and ECT from the teacher, TCM from ECT, MeanFlow, Shortcut and IMM from
    scratch) runs through Snakemake and reports pixel-space FD at each variant's NFEs (35 for the teacher's Heun
    sampler) and the ODE error of the runs with a diffusion teacher, and draws its sample grids."""
    small = "train.steps=20 sample.n=100 sample.batch=100 evaluate.floor_repeats=2"
    r = run_snakemake("--cores", "2", "--config", "suite=digits", f"results={tmp_path}", f"set={small}")
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(tmp_path / "tables" / "records_digits.csv")
    exp = Experiment(REPO / "configs")
    nfes = {v: exp.resolve("digits", "digits", v, 0).sample.nfe for v in exp.suite("digits")["variants"]}
    assert nfes["edm"] == [35] and nfes["shortcut"] == [1, 2, 4]
    got = set(zip(df.variant, df.nfe, df.metric))
    assert got == {(v, n, "fd") for v, ns in nfes.items() for n in ns} | {("cd", 1, "ode_error"), ("ect", 1, "ode_error")}
    assert (df.value > 0).all() and (df.value > df.ideal).all() and (df.backend == "cmbench-pixels").all()
    summary = (tmp_path / "tables" / "summary_digits.md").read_text()
    assert "fd @1" in summary and "fd @2" in summary
    # the sample grids: the teacher and every student at each NFE, the same 64 seeds in every panel
    src = np.load(tmp_path / "plots" / "digits_digits_samples.npz")
    panels = [("edm", 35)] + [(v, n) for v, ns in nfes.items() if v != "edm" for n in ns]
    assert list(zip(src["variant"], src["nfe"])) == panels
    assert src["seeds"].shape == (len(panels), 64) and (src["seeds"] == src["seeds"][0]).all()
    assert (tmp_path / "plots" / "digits_digits_samples.png").stat().st_size > 10_000
    # CD's ODE error against the teacher's Heun solution reaches the ODE-vs-quality study
    assert "digits, NFE 1, fd:" in (tmp_path / "tables" / "ode_vs_quality_digits.md").read_text()


def test_missing_dataset_fails_at_dry_run(tmp_path):
    r = run_snakemake("-n", "--cores", "1", "--config", "suite=cifar10", f"results={tmp_path}",
                      f"set=dataset.path={tmp_path / 'nowhere'}")
    assert r.returncode != 0
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("cmbench: config error")]
    assert len(err) == 1 and str(tmp_path / "nowhere") in err[0], r.stderr[-2000:]


def test_fid_records_from_one_sample_file(tmp_path, monkeypatch):
    """Both FID libraries read the same sample file of a CIFAR-shaped run (real photo patches, the CIFAR-10
    network's code path at reduced width) through the harness; with torch-fidelity's (He-initialised) weights in
    both, their values agree to rounding, and each record says how it was made."""
    import json

    from cmbench.metrics import fid
    from cmbench.metrics.evaluate import evaluate_run
    weights = tmp_path / "weights"
    weights.mkdir()
    fid.write_random_inception(weights / fid.TF_WEIGHTS)
    monkeypatch.setenv("CMBENCH_WEIGHTS", str(weights))
    specs = ["torch-fidelity", "clean-fid/legacy_tensorflow"]
    overrides = parse_overrides(["train.steps=2", "dataset.size=40", "sample.n=30", "sample.batch=30",
                                 "evaluate.pixel_fd=false", f"evaluate.fid={json.dumps(specs)}",
                                 "evaluate.cleanfid_network=torch-fidelity", "evaluate.batch=40"])
    cfg = check_run(Experiment(REPO / "configs").resolve("cifar_like", "patches", "ict", 0, overrides))
    rdir = paths.run_dir(tmp_path, cfg.run)
    loop.train(cfg, rdir, progress=False)
    sample_run(rdir, 1)
    records = {s: json.loads(evaluate_run(rdir, 1, tmp_path, s).read_text())[0] for s in specs}
    tf, cf = records["torch-fidelity"], records["clean-fid/legacy_tensorflow"]
    assert tf["value"] > 0 and abs(tf["value"] - cf["value"]) <= 1e-6 * tf["value"]
    assert (tf["backend"], cf["backend"], cf["mode"]) == ("torch-fidelity", "clean-fid", "legacy_tensorflow")
    assert tf["n_gen"] == cf["n_gen"] == 30 and tf["n_ref"] == 40 and tf["checkpoint_sha256"] == cf["checkpoint_sha256"]
    assert fid.TF_WEIGHTS in tf["feature_extractor"] and tf["nfe"] == 1 and tf["sigmas"] == [80.0]
    ref = paths.reference_file(tmp_path, "patches", tf["reference"], "torch-fidelity")
    assert ref.exists()      # cached: a second evaluation reuses it
    before = ref.stat().st_mtime_ns
    evaluate_run(rdir, 1, tmp_path, "torch-fidelity")
    assert ref.stat().st_mtime_ns == before


def test_fid_without_weights_is_one_clear_line(tmp_path):
    """With no weights file, the dry run stops before any job and names the missing file; nothing downloads."""
    r = run_snakemake("-n", "--cores", "1", "--config", "suite=digits", f"results={tmp_path}",
                      "set=evaluate.fid=[torch-fidelity]", env={"CMBENCH_WEIGHTS": str(tmp_path / "w")})
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("cmbench: config error")]
    assert r.returncode != 0 and len(err) == 1, r.stderr[-2000:]
    assert str(tmp_path / "w") in err[0] and "CMBENCH_WEIGHTS" in err[0]
