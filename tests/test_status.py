"""`cmbench status` (one line per run of a suite, read from the run dirs and sacct) and training's progress line in a
log with no terminal."""
import json
import re
import shutil
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
import yaml

from cmbench import checkpoint, io, paths
from cmbench.config import write_run_config
from cmbench.launch import run_stage
from cmbench.status import suite_status
from cmbench.train import loop
from cmbench.workflow import Plan
from conftest import REPO

# ECT on gauss1d distils a trained EDM teacher: one suite run and one teacher run outside the suite
SUITE = {"tiny": {"variants": ["ect"], "datasets": ["gauss1d"], "seeds": [0]}}
SETS = ["train.steps=20", "train.batch=16", "train.checkpoint_every=10", "train.log_every=4", "sample.n=200",
        "sample.nfe=[1]", "evaluate.ref_n=200", "evaluate.floor_repeats=2"]
STUDENT, TEACHER = "gauss1d/ect/s0", "gauss1d/edm/s0 (teacher)"
STOP_AT = 13     # the student is stopped as step 13 starts: stats lines at 4, 8, 12 steps, a checkpoint at 10


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("status")
    configs = root / "configs"
    shutil.copytree(REPO / "configs", configs)
    (configs / "experiment.yaml").write_text(yaml.safe_dump({"suites": SUITE}))
    return configs, root / "results"


def status(suite, sets=SETS) -> dict:
    configs, results = suite
    return {r.run: r for r in suite_status("tiny", str(configs), str(results), overrides=sets)}


def snapshot(folder: Path) -> dict:
    """Every file under folder: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


def last_stats(rdir) -> dict:
    return io.read_jsonl(paths.stats_file(rdir))[0][-1]


@pytest.fixture(scope="module")
def lifecycle(suite):
    """The suite's status at each point of its life (planned, teacher trained, student stopped mid-training,
    trained, evaluated), the student's last stats line at each, and a `cmbench status --json` run in a child
    process while this one holds the student's run lock, as its training job would."""
    configs, results = suite
    seen = {"planned": status(suite)}
    plan = Plan.from_snakemake({"suite": "tiny", "configs": str(configs), "results": str(results), "set": SETS})
    plan.write_configs()            # what Snakemake's onstart does
    (teacher, tcfg), = plan.teacher_runs.items()
    (student, scfg), = plan.runs.items()
    loop.train(tcfg, teacher, progress=False)
    seen["teacher trained"] = status(suite)

    def stop(step):
        if step == STOP_AT:
            raise Stop

    with pytest.raises(Stop):
        loop.train(scfg, student, progress=False, on_step=stop)
    seen["training"], stats = status(suite), {"training": last_stats(student), "teacher": last_stats(teacher)}
    seen["training, planned without --set"] = status(suite, sets=[])
    with checkpoint.run_lock(student):
        before = snapshot(results)
        cli = subprocess.run([sys.executable, "-m", "cmbench.cli", "status", "--suite", "tiny", "--configs",
                              str(configs), "--results", str(results), "--json"], capture_output=True, text=True)
        after = snapshot(results)
    loop.train(scfg, student, progress=False)
    seen["trained"] = status(suite)
    run_stage("run", student, None)
    seen["done"], stats["done"] = status(suite), last_stats(student)
    return seen, stats, (cli, before, after)


def test_a_planned_suite_lists_every_run_and_its_teacher_as_not_started(lifecycle):
    rows = lifecycle[0]["planned"]
    assert sorted(rows) == sorted([STUDENT, TEACHER])
    for r in rows.values():
        assert (r.stage, r.step, r.steps) == ("not started", 0, 20)       # train.steps from --set, as planned
        assert r.rate is r.eta_s is r.loss is r.updated is r.job_id is None


def test_a_trained_teacher_is_done_at_its_last_logged_loss(lifecycle):
    seen, stats, _ = lifecycle
    teacher, student = seen["teacher trained"][TEACHER], seen["teacher trained"][STUDENT]
    assert (teacher.stage, teacher.step, teacher.steps, teacher.loss) == ("done", 20, 20, stats["teacher"]["loss"])
    assert (student.stage, student.step) == ("not started", 0)


def test_a_run_mid_training_shows_its_last_stats_line(lifecycle):
    seen, stats, _ = lifecycle
    last = stats["training"]
    assert last["step"] + 1 == 12 > 10       # the stats line is ahead of the newest checkpoint
    for rows in (seen["training"], seen["training, planned without --set"]):    # config.json holds train.steps
        r = rows[STUDENT]
        assert (r.stage, r.step, r.steps, r.loss) == ("training", 12, 20, last["loss"])
        assert r.rate == pytest.approx(1000 / last["sec_per_kstep"])
        assert r.eta_s == pytest.approx(8 / r.rate)


def test_a_trained_run_is_sampling_then_done_after_evaluation(lifecycle):
    seen, stats, _ = lifecycle
    trained, done = seen["trained"][STUDENT], seen["done"][STUDENT]
    assert (trained.stage, trained.step, trained.eta_s) == ("sampling 0/1 NFE", 20, None)
    assert (done.stage, done.step, done.steps, done.loss) == ("done", 20, 20, stats["done"]["loss"])
    assert stats["done"]["step"] == 19


def test_status_changes_nothing_and_runs_while_a_job_holds_the_run_lock(lifecycle):
    cli, before, after = lifecycle[2]
    assert cli.returncode == 0, cli.stderr
    assert after == before and any(name.endswith("stats.jsonl") for name in before)
    rows = {r["run"]: r for r in json.loads(cli.stdout)}
    assert (rows[STUDENT]["stage"], rows[STUDENT]["step"]) == ("training", 12)


FAKE_SACCT = {  # what a sacct on PATH does → the state status shows for job 987654321
    "knows the job": ("printf '987654321|CANCELLED by 1000\\n'", "CANCELLED"),
    "does not know the job": ("exit 0", "unknown"),
    "fails": ("echo 'sacct: error: Problem talking to the database' >&2; exit 1", "unknown"),
    "is missing": (None, "unknown"),
}


@pytest.mark.parametrize("sacct", FAKE_SACCT)
def test_the_newest_slurm_job_of_a_run_gets_its_sacct_state_or_unknown(suite, tmp_path, monkeypatch, sacct):
    configs, _ = suite
    script, state = FAKE_SACCT[sacct]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if script is not None:
        (bin_dir / "sacct").write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / "sacct").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))      # no other sacct
    results = tmp_path / "results"
    plan = Plan.from_snakemake({"suite": "tiny", "configs": str(configs), "results": str(results), "set": SETS})
    (student, cfg), = plan.runs.items()
    jobs = paths.jobs_dir(student)
    for name, job_id, when in (("train", "111", 100.0), ("run", "987654321", 200.0), ("collect", "5", 50.0)):
        io.write_json(jobs / f"{name}.json", {"job_id": job_id, "launcher": "slurm", "config_hash": cfg.content_hash,
                                              "submitted": when})
    io.write_json(jobs / "sample-nfe1.json", {"job_id": "7", "launcher": "local", "submitted": 300.0})   # not Slurm
    rows = suite_status("tiny", str(configs), str(results), overrides=SETS)
    row, = [r for r in rows if r.job_id is not None]
    assert (row.run, row.job, row.job_id, row.job_state) == (STUDENT, "run", "987654321", state)


LINE = re.compile(r"cmbench: step (\d+)/20 \((\d+)%\) \S+ it/s, ETA (\d+:\d\d:\d\d), loss (\S+)")


def test_training_without_a_terminal_logs_a_progress_line_per_interval(suite, tmp_path):
    configs, _ = suite
    plan = Plan.from_snakemake({"suite": "tiny", "configs": str(configs), "results": str(tmp_path),
                                "set": SETS + ["train.log_every=1", "train.progress_seconds=0"]})
    (teacher, cfg), = plan.teacher_runs.items()
    other = cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress_seconds": 30.0})})
    assert other.hash == cfg.hash and other.content_hash != cfg.content_hash     # not a training setting
    write_run_config(cfg, teacher)
    log = tmp_path / "run.log"
    with open(log, "w") as out:      # as the workflow's rules run a stage: output to the run's log
        subprocess.run([sys.executable, "-m", "cmbench.cli", "launch", "train", "--run", str(teacher),
                        "--launcher", "inline"], stdout=out, stderr=subprocess.STDOUT, check=True)
    text = log.read_text()
    lines = [LINE.fullmatch(ln) for ln in text.splitlines() if ln.startswith("cmbench: step")]
    assert all(lines) and [int(m[1]) for m in lines] == list(range(1, 21))     # one line per step at interval 0
    assert [int(m[2]) for m in lines] == [100 * k // 20 for k in range(1, 21)] and lines[-1][3] == "0:00:00"
    stats = io.read_jsonl(paths.stats_file(teacher))[0]        # log_every 1: each line's loss is one step's
    assert [m[4] for m in lines] == [f"{s['loss']:.3g}" for s in stats]
    assert "\r" not in text          # no tqdm bar


class Terminal(StringIO):
    def isatty(self):
        return True


def test_training_on_a_terminal_keeps_the_bar_and_logs_no_progress_line(suite, tmp_path, monkeypatch):
    configs, _ = suite
    plan = Plan.from_snakemake({"suite": "tiny", "configs": str(configs), "results": str(tmp_path),
                                "set": SETS + ["train.progress_seconds=0"]})
    (teacher, cfg), = plan.teacher_runs.items()
    monkeypatch.setattr(sys, "stderr", Terminal())
    loop.train(cfg, teacher)
    shown = sys.stderr.getvalue()
    assert "| 0/20 [" in shown and "cmbench: step" not in shown      # tqdm's bar (2 s refresh: a 0.2 s run shows 0)
