"""The Slurm path for real: sbatch through submitit on the single-node cluster of slurm/dev-cluster.sh.

Skipped where no cluster answers, unless CMBENCH_REQUIRE_SLURM=1 (CI sets it, so there they must run)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import submitit
import yaml
from submitit.core.utils import JobPaths, cloudpickle_dump

from cmbench import paths
from cmbench.config import Experiment
from cmbench import checkpoint
from cmbench.train import loop
from cmbench.checks import check_run
from conftest import REPO


def _cluster_up() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


if not _cluster_up():
    if os.environ.get("CMBENCH_REQUIRE_SLURM") == "1":
        raise RuntimeError("CMBENCH_REQUIRE_SLURM=1 but no Slurm cluster answers (slurm/dev-cluster.sh start)")
    pytest.skip("no Slurm cluster (slurm/dev-cluster.sh start)", allow_module_level=True)

DEV = REPO / "configs" / "launch" / "slurm-dev.yaml"
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
# long enough (~25 s at ~2 s per 1k steps) to outlast Slurm's 7 s kill grace after a requeue and a Snakemake restart
LONG = ["train.steps=12000", "train.batch=64", "train.checkpoint_every=200"]


def launch_cmd(results, variant="ict", sets=(), stage="train"):
    """Plan the run (its config.json, through the CLI, as the workflow does before its first job) and return the
    command that launches one of its stages on Slurm by its run directory."""
    plan = [sys.executable, "-m", "cmbench.cli", "resolve", "--configs", str(REPO / "configs"), "--dataset", "gauss1d",
            "--variant", variant, "--seed", "0", "--write", str(results), *[a for s in sets for a in ("--set", s)]]
    rdir = subprocess.run(plan, capture_output=True, text=True, check=True, env=ENV).stdout.strip()
    return [sys.executable, "-m", "cmbench.cli", "launch", stage, "--launcher", "slurm", "--launch-config", str(DEV),
            "--run", rdir]


def inline_final(tmp_path, sets, variant="ict"):
    over = {}
    for s in sets:
        key, value = s.split("=")
        over.setdefault("train", {})[key.split(".")[1]] = int(value)
    cfg = check_run(Experiment(REPO / "configs").resolve("toy", "gauss1d", variant, 0, over))
    return loop.train(cfg, paths.run_dir(tmp_path / "inline", cfg.run), progress=False)


def assert_same_weights(a, b):
    a, b = checkpoint.load(a), checkpoint.load(b)
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def sacct(job_id: str) -> list[str]:
    """The job's state history (with requeues), once the last state is final: a job's result file can
    appear before Slurm's accounting has recorded the end of the job."""
    deadline = time.time() + 60
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-D", "-j", job_id, "-o", "State"], capture_output=True,
                             text=True, check=True).stdout
        states = [s.strip() for s in out.splitlines() if s.strip()]
        if states and states[-1] not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED") or time.time() > deadline:
            return states
        time.sleep(0.5)


def state_now(job_id: str) -> list[str]:
    return subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True,
                          check=True).stdout.split()


def record(results, stage="train") -> Path:
    return results / "runs" / "toy" / "gauss1d" / "ict" / "s0" / "jobs" / f"{stage}.json"


def wait_for(predicate, timeout=120):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_train_through_sbatch_equals_inline(tmp_path):
    sets = ["train.steps=300"]
    r = subprocess.run(launch_cmd(tmp_path, sets=sets), capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    job_id = json.loads(record(tmp_path).read_text())["job_id"]
    assert sacct(job_id) == ["COMPLETED"]
    assert_same_weights(tmp_path / "runs/toy/gauss1d/ict/s0/final.pt", inline_final(tmp_path, sets))


def test_requeued_job_resumes_bit_identical(tmp_path):
    proc = subprocess.Popen(launch_cmd(tmp_path, sets=LONG), stderr=subprocess.PIPE, text=True, env=ENV)
    ckdir = tmp_path / "runs/toy/gauss1d/ict/s0/checkpoints"
    wait_for(lambda: record(tmp_path).exists() and checkpoint.list_checkpoints(ckdir))
    job_id = json.loads(record(tmp_path).read_text())["job_id"]
    subprocess.run(["scontrol", "requeue", job_id], check=True)          # as a preemption does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    states = sacct(job_id)
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states
    log = (tmp_path / "runs/toy/gauss1d/ict/s0/jobs" / f"{job_id}_0_log.err").read_text()
    assert "resuming" in log
    assert_same_weights(tmp_path / "runs/toy/gauss1d/ict/s0/final.pt", inline_final(tmp_path, LONG))


def test_restarted_launch_reattaches_instead_of_resubmitting(tmp_path):
    proc = subprocess.Popen(launch_cmd(tmp_path, sets=LONG), stderr=subprocess.DEVNULL, env=ENV)
    wait_for(lambda: record(tmp_path).exists())
    job_id = json.loads(record(tmp_path).read_text())["job_id"]
    os.kill(proc.pid, signal.SIGKILL)                                     # the login-node process dies
    proc.wait()
    r = subprocess.run(launch_cmd(tmp_path, sets=LONG), capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    assert f"re-attaching to job {job_id}" in r.stderr
    assert json.loads(record(tmp_path).read_text())["job_id"] == job_id
    name = "cmbench-ict-train"
    out = subprocess.run(["sacct", "-n", "-X", "-o", "JobID,JobName%40", "-S", "now-1hour"], capture_output=True,
                         text=True, check=True).stdout
    mine = [ln.split()[0] for ln in out.splitlines() if name in ln and ln.split()[0] == job_id]
    assert mine == [job_id]                                               # one job for this run, not two


def test_a_reattached_job_that_ends_without_its_outputs_is_run_again(tmp_path):
    """A restarted Snakemake removes the outputs of a job it did not see finish, then runs the rule: the job the
    launch re-attaches to may have written them just before, and Slurm may still list it as running after submitit
    calls it done (its result file exists): seen in CI, twice. Here the recorded job is a stand-in that is still
    running, with a successful result and no outputs: the launch notices and runs the stage again."""
    cmd = launch_cmd(tmp_path, sets=["train.steps=50"])
    rdir = Path(cmd[-1])
    stand_in = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 600"], capture_output=True,
                              text=True, check=True).stdout.strip().split(";")[0]
    try:
        wait_for(lambda: state_now(stand_in) == ["RUNNING"])      # accounting lags a new job
        content_hash = json.loads((rdir / "config.json").read_text())["content_hash"]
        record(tmp_path).parent.mkdir(parents=True, exist_ok=True)
        record(tmp_path).write_text(json.dumps({"job_id": stand_in, "launcher": "slurm", "config_hash": content_hash}))
        cloudpickle_dump(("success", None), JobPaths(record(tmp_path).parent, stand_in, task_id=0).result_pickle)
        r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        assert state_now(stand_in) == ["RUNNING"]                 # the launch took it as done while Slurm did not
    finally:
        subprocess.run(["scancel", stand_in], check=True)
    assert r.returncode == 0, r.stderr
    assert f"re-attaching to job {stand_in}" in r.stderr
    assert f"job {stand_in} (train) ended but its outputs are gone" in r.stderr
    again = json.loads(record(tmp_path).read_text())["job_id"]
    assert again != stand_in and sacct(again) == ["COMPLETED"] and (rdir / "final.pt").exists()


def test_a_job_not_yet_in_slurms_accounting_counts_as_alive(tmp_path, monkeypatch):
    """sacct lags a new job by seconds; a re-attaching launch that believed it would submit the stage twice. The
    stand-in's accounting is hidden (as it is in the first seconds); the controller still lists it."""
    from cmbench import launch
    stand_in = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 600"], capture_output=True,
                              text=True, check=True).stdout.strip().split(";")[0]
    monkeypatch.setattr(launch, "_state", lambda job: "UNKNOWN")
    try:
        job = submitit.SlurmJob(folder=tmp_path, job_id=stand_in)
        wait_for(lambda: launch._live_state(job) == "RUNNING")
    finally:
        subprocess.run(["scancel", stand_in], check=True)
    sacct(stand_in)                                    # ended
    assert launch._live_state(job) not in launch.LIVE_STATES      # ended: dead to a re-attaching launch


def test_job_failing_on_the_node_fails_the_launch_with_its_log(tmp_path):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a checkpoint")           # exists where the config is checked; unreadable on the node
    r = subprocess.run(launch_cmd(tmp_path, sets=[f"train.init_from={bad}", "train.steps=50"]),
                       capture_output=True, text=True, env=ENV)
    assert r.returncode != 0
    assert "cmbench: error: job" in r.stderr and "failed" in r.stderr and "log tail" in r.stderr
    assert re.match(r"[\w.]+: ", r.stderr.strip().splitlines()[-1])   # the job's own exception, from its log
    assert "submitting it again" not in r.stderr                    # it ran: running it again would fail again
    assert len(list((tmp_path / "runs/toy/gauss1d/ict/s0/jobs").glob("*_submission.sh"))) == 1


def test_snakemake_profile_slurm_runs_the_suite_through_sbatch(tmp_path):
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"x")
    broken = yaml.safe_load((configs / "variants" / "ict.yaml").read_text())
    broken["train"]["init_from"] = str(bad)
    (configs / "variants" / "ict_broken.yaml").write_text(yaml.safe_dump(broken))
    suite = {"variants": ["ict", "ict_broken"], "datasets": ["gauss1d"], "seeds": [0, 1]}
    (configs / "experiment.yaml").write_text(yaml.safe_dump({"suites": {"mini": suite}}))
    small = "train.steps=200 sample.n=1000 evaluate.ref_n=1000 evaluate.floor_repeats=2"
    cmd = [sys.executable, "-m", "snakemake", "all", "-s", str(REPO / "Snakefile"), "--profile", str(REPO / "slurm"),
           "--directory", str(tmp_path), "--config", f"configs={configs}", "suite=mini", f"set={small}",
           f"launch_config={DEV}", "--latency-wait", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out                                        # the broken runs fail ...
    for seed in (0, 1):                                                  # ... and, with keep-going, the rest finish
        assert (tmp_path / f"results/runs/mini/gauss1d/ict/s{seed}/metrics/records.json").exists(), out
    log = (tmp_path / "results/runs/mini/gauss1d/ict_broken/s0/logs/train.log").read_text()
    assert "cmbench: error: job" in log and "log tail" in log
    stages = {"train", "sample-nfe1", "sample-nfe2", "evaluate-nfe1", "evaluate-nfe2", "collect"}
    for seed in (0, 1):                                                  # every stage was a job, and sacct saw it
        records = {p.stem: json.loads(p.read_text())["job_id"]
                   for p in (tmp_path / f"results/runs/mini/gauss1d/ict/s{seed}/jobs").glob("*.json")}
        assert stages <= set(records)
        assert all(sacct(j) == ["COMPLETED"] for j in records.values())
    # the same seeds through the laptop path (one fused in-process job per run) give the same records
    local = tmp_path / "local"
    local.mkdir()
    (configs / "experiment.yaml").write_text(yaml.safe_dump({"suites": {"mini": {**suite, "variants": ["ict"]}}}))
    subprocess.run([sys.executable, "-m", "snakemake", "all", "--cores", "2", "-s", str(REPO / "Snakefile"),
                    "--directory", str(local), "--config", f"configs={configs}", "suite=mini", f"set={small}"],
                   capture_output=True, text=True, env=ENV, check=True)
    cols = ["seed", "nfe", "metric", "value", "config_hash", "checkpoint_sha256"]
    ours = pd.DataFrame([r for s in (0, 1) for r in json.loads(
        (tmp_path / f"results/runs/mini/gauss1d/ict/s{s}/metrics/records.json").read_text())])[cols]
    theirs = pd.DataFrame([r for s in (0, 1) for r in json.loads(
        (local / f"results/runs/mini/gauss1d/ict/s{s}/metrics/records.json").read_text())])[cols]
    pd.testing.assert_frame_equal(ours.reset_index(drop=True), theirs.reset_index(drop=True))


def test_two_task_training_job_matches_single_rank(tmp_path):
    """One Slurm job, two tasks: torch.distributed ranks (gloo on CPU) from submitit's environment."""
    dev = yaml.safe_load(DEV.read_text())
    dev["jobs"]["train"]["tasks_per_node"] = 2
    launch_cfg = tmp_path / "two-tasks.yaml"
    launch_cfg.write_text(yaml.safe_dump(dev))
    sets = ["train.steps=300", "train.batch=64", "train.log_every=25"]
    cmd = launch_cmd(tmp_path, sets=sets)
    cmd[cmd.index(str(DEV))] = str(launch_cfg)
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    job_id = json.loads(record(tmp_path).read_text())["job_id"]
    tasks = subprocess.run(["sacct", "-n", "-j", f"{job_id}.0", "-o", "NTasks"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert tasks == ["2"]
    ours = checkpoint.load(tmp_path / "runs/toy/gauss1d/ict/s0/final.pt")["ema"]
    single = checkpoint.load(inline_final(tmp_path, sets))["ema"]
    assert all(torch.allclose(ours[k], single[k], atol=1e-5) for k in ours)


def test_killed_snakemake_reattaches_on_restart(tmp_path):
    """Kill the login-node Snakemake while its training job runs; the restarted workflow waits for that same job."""
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    suite = {"variants": ["ict"], "datasets": ["gauss1d"], "seeds": [0]}
    (configs / "experiment.yaml").write_text(yaml.safe_dump({"suites": {"mini": suite}}))
    long = " ".join(LONG + ["sample.n=1000", "evaluate.ref_n=1000", "evaluate.floor_repeats=2"])
    cmd = [sys.executable, "-m", "snakemake", "all", "-s", str(REPO / "Snakefile"), "--profile", str(REPO / "slurm"),
           "--directory", str(tmp_path), "--config", f"configs={configs}", "suite=mini", f"set={long}",
           f"launch_config={DEV}", "--latency-wait", "5"]
    run = tmp_path / "results/runs/mini/gauss1d/ict/s0"
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    wait_for(lambda: (run / "jobs" / "train.json").exists())
    job_id = json.loads((run / "jobs" / "train.json").read_text())["job_id"]
    first.kill()                                                          # SIGKILL: no clean-up of any kind
    first.wait()
    shutil.rmtree(tmp_path / ".snakemake" / "locks", ignore_errors=True)   # what `snakemake --unlock` does
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"re-attaching to job {job_id}" in (run / "logs" / "train.log").read_text()
    submitted = [p.name.split("_")[0] for p in (run / "jobs").glob("*_submission.sh")]   # one per submitted job

    def name(j):
        return subprocess.run(["sacct", "-n", "-X", "-j", j, "-o", "JobName%40"], capture_output=True, text=True,
                              check=True).stdout.split()[0]

    assert [j for j in submitted if name(j) == "cmbench-ict-train"] == [job_id]   # one training job, not two
    assert sacct(job_id)[-1] == "COMPLETED"


DEFAULT = REPO / "configs" / "launch" / "slurm.yaml"


def facts(tmp_path, suites) -> Path:
    """The default launch config with `suites` in place of its own."""
    path = tmp_path / "facts.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(DEFAULT.read_text()), "suites": suites}))
    return path


def with_facts(cmd, path):
    cmd[cmd.index(str(DEV))] = str(path)
    return cmd


def test_default_cluster_facts_run_a_toy_job_on_a_cpu_only_cluster(tmp_path):
    """configs/launch/slurm.yaml as it comes: no GPU, one CPU, minutes."""
    r = subprocess.run(with_facts(launch_cmd(tmp_path, sets=["train.steps=50"]), DEFAULT),
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr
    job_id = json.loads(record(tmp_path).read_text())["job_id"]
    assert sacct(job_id) == ["COMPLETED"]
    asked = subprocess.run(["sacct", "-n", "-X", "-j", job_id, "-o", "ReqTRES%80,TimelimitRaw"], capture_output=True,
                           text=True, check=True).stdout
    assert "cpu=1," in asked and "gres" not in asked and int(asked.split()[-1]) <= 120


def test_sbatch_rejection_is_one_line_naming_the_job_kind_and_the_rejected_option(tmp_path):
    r = subprocess.run(with_facts(launch_cmd(tmp_path, sets=["train.steps=50"]),
                                  facts(tmp_path, {"toy": {"train": {"gpus_per_node": 8}}})),
                       capture_output=True, text=True, env=ENV)
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("cmbench: error: sbatch rejected the train job of suite toy")
    assert "gres" in r.stderr and "gpus_per_node=8" in r.stderr and "suites.toy.train" in r.stderr


def test_idle_cluster_flooded_with_short_jobs_starts_every_one(tmp_path):
    """Slurm opens a job's log as it starts: the folder must exist before sbatch (no per-job %j folder)."""
    from cmbench.launch import _submit, job_folder
    folder = job_folder(tmp_path / "run")
    slurm = {"timeout_min": 5, "cpus_per_task": 1, "mem_gb": 0.25}
    jobs = [_submit("slurm", folder, "cmbench-flood", slurm, os.getpid) for _ in range(30)]
    for job in jobs:
        script = Path(job.paths.submission_file).read_text()
        logs = [Path(ln.split("=", 1)[1]) for ln in script.splitlines() if ln.startswith(("#SBATCH --output",
                                                                                         "#SBATCH --error"))]
        assert logs and all(log.parent == folder for log in logs), script
    pids = [job.result() for job in jobs]
    assert len(pids) == 30
    assert all(sacct(job.job_id) == ["COMPLETED"] for job in jobs)


def test_a_job_failing_before_it_runs_is_resubmitted_at_most_twice(tmp_path, monkeypatch, capsys):
    """A job whose log Slurm cannot open fails at second 0 with no log (as in the %j folder race)."""
    from cmbench import launch
    from cmbench.config import load_launch_config
    from cmbench.errors import JobFailed
    rdir = launch_cmd(tmp_path, sets=["train.steps=50"])[-1]
    submit, broken = launch._submit, []

    def unopenable_log_first(n):
        def wrapped(launcher, folder, name, slurm, fn, *args):
            nowhere = {"output": "/nonexistent/%j.out", "error": "/nonexistent/%j.err"}
            job = submit(launcher, folder, name, {**slurm, "slurm_additional_parameters": nowhere}
                         if len(broken) < n else slurm, fn, *args)
            broken.append(job.job_id)
            return job
        return wrapped

    monkeypatch.setattr(launch, "_submit", unopenable_log_first(1))
    launch.launch("train", rdir, None, "slurm", load_launch_config(DEV))
    err = capsys.readouterr().err
    assert f"job {broken[0]} (train) failed before it ran (FAILED, no log): submitting it again (1 of 2)" in err
    assert sacct(broken[0]) == ["FAILED"] and sacct(broken[1]) == ["COMPLETED"] and len(broken) == 2
    assert (Path(rdir) / "final.pt").exists()

    broken.clear()
    monkeypatch.setattr(launch, "_submit", unopenable_log_first(10))
    with pytest.raises(JobFailed) as e:
        launch.launch("sample", rdir, 1, "slurm", load_launch_config(DEV))
    assert len(broken) == 3 and capsys.readouterr().err.count("failed before it ran") == 2
    assert f"job {broken[-1]} (sample) failed before it ran (FAILED, no log), 3 times in a row" in str(e.value)


def test_preemption_signal_checkpoints_the_last_whole_step_and_the_requeued_job_ends_bit_identical(tmp_path):
    """submitit's signal (USR2, as Slurm sends it before a preemption or the time limit) mid-run: the job saves the
    state after its last whole step, requeues itself and resumes there. No periodic checkpoint could help."""
    sets = ["train.steps=3000", "train.batch=64", "train.checkpoint_every=100000", "train.log_every=100"]
    proc = subprocess.Popen(launch_cmd(tmp_path, sets=sets), stderr=subprocess.PIPE, text=True, env=ENV)
    run = tmp_path / "runs/toy/gauss1d/ict/s0"
    wait_for(lambda: (run / "stats.jsonl").exists() and len((run / "stats.jsonl").read_text().splitlines()) >= 5)
    job_id = json.loads(record(tmp_path).read_text())["job_id"]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)   # to the job's tasks, as Slurm's --signal does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    states = sacct(job_id)
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states
    log = (run / "jobs" / f"{job_id}_0_log.err").read_text()
    signalled, saved = map(int, re.search(r"preemption signal during step (\d+): checkpointed the state after "
                                          r"(\d+) steps", log).groups())
    assert 500 <= signalled < saved <= signalled + 1 < 3000        # the step in progress completes; no step lost
    assert f"from ckpt-{saved:09d}.pt (step {saved})" in log       # the requeued job resumed there
    assert_same_weights(run / "final.pt", inline_final(tmp_path, sets))


def test_a_job_its_partition_cannot_hold_is_named_in_one_line_while_it_waits(tmp_path):
    """Slurm takes a 2-node job on a 1-node cluster and keeps it pending for ever (PartitionNodeLimit)."""
    proc = subprocess.Popen(with_facts(launch_cmd(tmp_path, sets=["train.steps=50"]),
                                       facts(tmp_path, {"toy": {"train": {"nodes": 2}}})),
                            stderr=subprocess.PIPE, text=True, env=ENV)
    watchdog = threading.Timer(60, proc.kill)           # no note: readline would wait as long as the job pends
    watchdog.start()
    try:
        lines = [proc.stderr.readline(), proc.stderr.readline()]
    finally:
        watchdog.cancel()
        job_id = json.loads(record(tmp_path).read_text())["job_id"]
        subprocess.run(["scancel", job_id], check=True)
    _, rest = proc.communicate(timeout=60)
    assert rest.strip() == f"cmbench: error: job {job_id} (train) was cancelled (sacct -j {job_id})"
    assert f"cmbench: job {job_id} waits for what its partition cannot give (PartitionNodeLimit)" in lines[1]
    assert "the train job asks" in lines[1] and "nodes=2" in lines[1] and "suites.toy.train" in lines[1]
    assert proc.returncode != 0
