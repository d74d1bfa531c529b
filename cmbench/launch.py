"""Run a stage of one run through submitit and block until it ends (DESIGN.md property 2).

Launchers: `inline` calls the stage in this process (no submitit; the laptop toy default, one process per
rule); `debug` is submitit's in-process DebugExecutor (drops into pdb on error: for interactive debugging);
`local` is submitit's LocalExecutor (a child process per job); `slurm` submits with sbatch through submitit,
records the job id in the run dir, and re-attaches to that job after a restart instead of submitting again."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError

from cmbench import io, paths
from cmbench.config import LaunchConfig, RunConfig, SlurmJob, load_run_config
from cmbench.errors import JobFailed

RESUBMITS = 2       # how often a job that failed before it ran (no log, NODE_FAIL, BOOT_FAIL) is submitted again
NEVER_RAN = ("NODE_FAIL", "BOOT_FAIL")
# why a job can stay pending for ever: it asks more than its partition has (QOS and association limits "...PerJob")
CANNOT_START = ("PartitionNodeLimit", "PartitionTimeLimit", "PartitionConfig", "BadConstraints")
# a job worth waiting for. Not COMPLETED: Snakemake deletes the outputs of a job it did not see finish, so a
# finished job is run again (training resumes from its checkpoints; the other stages are short)
LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING",
               "SUSPENDED")


class Preemption:
    """submitit's handler of the preemption and time-limit signal checkpoints the job's call, requeues it and
    exits, from whatever bytecode the main thread was at: possibly mid-step. While a job trains, the signal only
    sets a flag; the loop then checkpoints the state after its last whole step (on_step returns True) and, once
    saved (on_save), submitit's handler runs: a requeue loses at most the step in progress. Outside a submitit
    job (no Python handler for the signal) nothing changes."""

    def __init__(self):
        self.signum = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        self.handler, self.signalled, self.step, self.signal_step = None, False, 0, 0

    def __enter__(self):
        self.handler = signal.getsignal(self.signum)
        if callable(self.handler):
            signal.signal(self.signum, self._defer)
        return self

    def _defer(self, signum, frame):
        # nothing else here: printing could re-enter a write in progress
        self.signalled, self.signal_step = True, self.step

    def on_step(self, step: int) -> bool:
        self.step = step
        return self.signalled

    def on_save(self, step: int, seconds: float) -> None:
        if self.signalled:
            print(f"cmbench: preemption signal during step {self.signal_step}: checkpointed the state after {step} "
                  f"steps", file=sys.stderr)
            self._hand_over()

    def _hand_over(self):
        signal.signal(self.signum, self.handler)
        self.handler(self.signum, None)   # submitit: checkpoint the call, requeue, exit (rank 0; others return)

    def __exit__(self, exc_type, *exc):
        if callable(self.handler):
            signal.signal(self.signum, self.handler)
            if self.signalled and exc_type is None:    # came after the last step: training is done
                self._hand_over()


def _train(rdir, nfe, metric):
    from cmbench.train.loop import train
    with Preemption() as p:
        train(load_run_config(rdir), rdir, on_step=p.on_step, on_save=p.on_save)


def _sample(rdir, nfe, metric):
    """One shard per task when the job has several (each task samples a contiguous block of seeds)."""
    from cmbench.sample import sample_run
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sample_run(rdir, nfe, shard=rank, shards=world)


def _evaluate(rdir, nfe, metric):
    from cmbench.metrics.evaluate import evaluate_run
    evaluate_run(rdir, nfe, paths.results_of(rdir), metric)


def _reference(rdir, nfe, metric):
    """The cached reference of a metric set, built from the config of a run that uses it."""
    from cmbench.metrics.evaluate import build_reference, reference_path
    cfg = load_run_config(rdir)
    build_reference(cfg, nfe, reference_path(cfg, nfe, paths.results_of(rdir), metric), metric)


def _collect(rdir, nfe, metric):
    from cmbench.metrics.evaluate import collect_records
    collect_records(rdir)


def _run(rdir, nfe, metric):
    """Every stage of a run in one process: on a laptop, starting Python and torch costs more than a toy
    run's sampling and evaluation (DESIGN.md, cost notes)."""
    cfg = load_run_config(rdir)
    _train(rdir, None, None)
    for n in cfg.sample.nfe:
        _sample(rdir, n, None)
        for m in cfg.metric_sets():
            _evaluate(rdir, n, m)
    _collect(rdir, None, None)


STAGES = {"train": _train, "sample": _sample, "evaluate": _evaluate, "reference": _reference,
          "collect": _collect, "run": _run}
RUN_STAGES = ("train", "collect", "run")       # the stages that act on a whole run, not one NFE
SPLIT_STAGES = ("train", "sample")             # the stages a job may split over several tasks (ranks, shards)
SPLIT_KINDS = ("teacher", "train", "sample")    # their job kinds


def stage_outputs(stage: str, rdir: Path, nfe: int | None, metric: str, tasks: int) -> list[Path]:
    """The files a stage's job leaves (what the Snakefile rule declares; a split sample job: its shards)."""
    if stage == "reference":
        from cmbench.metrics.evaluate import reference_path
        return [reference_path(load_run_config(rdir), nfe, paths.results_of(rdir), metric)]
    if stage == "sample":
        return ([paths.samples_shard(rdir, nfe, k, tasks) for k in range(tasks)] if tasks > 1
                else [paths.samples_file(rdir, nfe)])
    if stage == "evaluate":
        return [paths.metrics_file(rdir, nfe, metric)]
    return {"train": [paths.final_weights(rdir)], "collect": [paths.records_file(rdir)],
            "run": [paths.final_weights(rdir), paths.records_file(rdir)]}[stage]


def run_stage(stage: str, rdir: str, nfe: int | None, metric: str = "data") -> None:
    """The job function (importable, so submitit can pickle it). Takes the run directory, whose config.json
    (written when the workflow was planned) is all a stage reads. The run dir's lock is taken here, inside the
    job (not by the process that waits for it): a fused run holds it exclusively for all its stages, samplers
    share it; training takes it itself (rank 0 only: cmbench.train.loop.train)."""
    from cmbench.checkpoint import run_lock
    locked = stage in ("run", "sample")
    with run_lock(rdir, shared=stage == "sample") if locked else contextlib.nullcontext():
        STAGES[stage](Path(rdir), nfe, metric)


def job_name(stage: str, nfe: int | None, metric: str = "data") -> str:
    name = stage if nfe is None else f"{stage}-nfe{nfe}"
    return name if metric == "data" or stage not in ("evaluate", "reference") else f"{name}-{metric.replace('/', '-')}"


def job_kind(stage: str, cfg: RunConfig) -> str:
    """Which resources of the launch config a stage gets."""
    if stage in ("train", "run"):
        return "teacher" if cfg.loss["name"] == "edm" else "train"
    return "sample" if stage == "sample" else "evaluate"


class StageJob(submitit.helpers.Checkpointable):
    """On timeout or preemption submitit calls checkpoint(), which (inherited) resubmits the same call; training
    checkpoints first (Preemption), so the requeued job resumes where it stopped. With several tasks, on one node
    or several, each is one torch.distributed rank of a training job (cmbench.train.distributed)."""

    def __call__(self, stage, rdir, nfe, metric="data"):
        if submitit.JobEnvironment().num_tasks > 1:
            if stage not in SPLIT_STAGES:
                raise ValueError(f"stage {stage!r} runs as one task; only {SPLIT_STAGES} are split over tasks")
            # every GPU of the node stays visible: each rank takes the one of its LOCAL_RANK (cmbench.devices)
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        run_stage(stage, rdir, nfe, metric)


def _slurm_parameters(job: SlurmJob, kind: str) -> dict:
    tasks = (job.tasks_per_node or max(job.gpus_per_node, 1)) if kind in SPLIT_KINDS else 1
    params = {"timeout_min": job.timeout_min, "cpus_per_task": job.cpus_per_task, "mem_gb": job.mem_gb,
              "gpus_per_node": job.gpus_per_node, "tasks_per_node": tasks,
              "nodes": job.nodes if kind in SPLIT_KINDS else 1}
    params.update({f"slurm_{k}": v for k, v in (("partition", job.partition), ("account", job.account)) if v})
    return params


# sbatch's complaint → the key of the cluster facts behind it (first match wins: "account/partition" is the account)
SBATCH_OPTIONS = (("gres", "gpus_per_node"), ("generic resource", "gpus_per_node"), ("memory", "mem_gb"),
                  ("account", "account"), ("association", "account"), ("partition", "partition"),
                  ("time limit", "timeout_min"), ("node count", "nodes"), ("processors", "cpus_per_task"),
                  ("cpu", "cpus_per_task"))


def _rejected(err: FailedJobError, kind: str, suite: str, job: SlurmJob) -> JobFailed:
    """sbatch's refusal as one line: its first complaint and the cluster fact it is about."""
    lines = [ln.removeprefix("sbatch: error: ").strip() for ln in str(err).splitlines() if ln.strip()]
    said = lines[0] if lines else "no message"
    keys = [key for word, key in SBATCH_OPTIONS if word in " ".join(lines).lower()]
    which = f"{keys[0]}={getattr(job, keys[0])!r}" if keys else "the resources"
    return JobFailed(f"sbatch rejected the {kind} job of suite {suite}: {said}; fix {which} of that job in the "
                     f"launch config (suites.{suite}.{kind}, else jobs.{kind})")


def _asks(job: SlurmJob) -> str:
    return ", ".join(f"{k}={v}" for k, v in job.model_dump().items() if v is not None)


def job_folder(rdir: Path) -> Path:
    """Where submitit keeps the jobs of a run (scripts, pickles, logs): one fixed folder, made before any job is
    submitted. Slurm opens a job's log as the job starts, which on an idle cluster can be before submitit would
    have made a per-job folder (jobs/%j): the job then fails at once, with no log."""
    folder = paths.jobs_dir(rdir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _submit(launcher: str, folder: Path, name: str, slurm: dict | None, fn, *args):
    executor = submitit.AutoExecutor(folder=folder, cluster=launcher)
    executor.update_parameters(name=name, **(slurm or {}))
    with contextlib.redirect_stderr(StringIO()):     # submitit echoes sbatch's stderr; _rejected says it once
        return executor.submit(fn, *args)


def _reattach(record: Path, folder: Path, cfg_hash: str, tasks: int):
    """The job recorded by an earlier launch of this stage, if it is still alive and runs this config;
    otherwise None."""
    if not record.exists():
        return None
    saved = json.loads(record.read_text())
    if saved.get("launcher") != "slurm" or saved.get("config_hash") != cfg_hash:
        return None
    job = submitit.SlurmJob(folder=folder, job_id=saved["job_id"], tasks=range(tasks))
    return job if _live_state(job) in LIVE_STATES else None


def _state(job) -> str:
    return job.get_info(mode="force").get("State", "UNKNOWN").split()[0]


def _live_state(job) -> str:
    """The job's state, from the controller where Slurm's accounting does not list it yet (sacct lags a new job by
    a few seconds: a job just submitted by a killed workflow would look dead, and be submitted twice)."""
    state = _state(job)
    if state != "UNKNOWN":
        return state
    queued = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return queued.strip() or state


def _logs(job) -> list[Path]:
    return sorted(Path(job.paths.folder).glob(f"{job.job_id}_*_log.*"))


def _never_ran(job, state: str) -> str | None:
    """Why a finished Slurm job never ran its program (a node or its boot failed; or Slurm could not start it:
    no log, no result), or None: it ran, and running it again would fail again."""
    if state in NEVER_RAN:
        return state
    if state == "FAILED" and not _logs(job) and not job.paths.result_pickle.exists():
        return f"{state}, no log"
    return None


def _wait(job, poll_s: float, asks: str) -> None:
    """Poll at a modest rate (one sacct call per poll): after 1 s, then ever less often, up to every poll_s (a
    2-minute toy job is not kept waiting 30 s; a 2-day one asks sacct every 30 s). Says once, in one line, when
    Slurm keeps the job pending because its partition cannot hold what it `asks` (Slurm does not refuse those)."""
    delay, told = min(1.0, poll_s), False
    while not job.done(force_check=True):
        if not told and job.get_info(mode="cache").get("State") == "PENDING":
            reason = subprocess.run(["squeue", "-h", "-j", job.job_id, "-o", "%r"], capture_output=True,
                                    text=True).stdout.strip()
            if reason in CANNOT_START or "PerJob" in reason:
                print(f"cmbench: job {job.job_id} waits for what its partition cannot give ({reason}): {asks}",
                      file=sys.stderr)
                told = True
        time.sleep(delay)
        delay = min(2 * delay, poll_s)


def _results(job) -> None:
    """Every task's result (a training job may run one task per rank); on failure JobFailed with the log's tail."""
    try:
        job.results()
    except Exception as e:
        logs = [log for log in _logs(job) if log.suffix == ".err"]
        tail = "\n".join(ln for log in logs for ln in log.read_text().splitlines()[-30:])
        raise JobFailed(f"job {job.job_id} failed: {type(e).__name__}; log tail "
                        f"({', '.join(map(str, logs))}):\n{tail}") from None


def launch(stage: str, rdir: str | Path, nfe: int | None, launcher: str, launch_cfg: LaunchConfig | None = None,
           metric: str = "data") -> None:
    rdir = Path(rdir)
    cfg = load_run_config(rdir)       # a missing or damaged config.json fails here, before anything is submitted
    if launcher == "inline":
        return run_stage(stage, str(rdir), nfe, metric)
    folder = job_folder(rdir)
    record, kind = folder / f"{job_name(stage, nfe, metric)}.json", job_kind(stage, cfg)
    facts = launch_cfg.job(cfg.run.suite, kind) if launcher == "slurm" else None
    slurm = _slurm_parameters(facts, kind) if facts else None
    tasks = slurm["nodes"] * slurm["tasks_per_node"] if slurm else 1
    job = _reattach(record, folder, cfg.content_hash, tasks) if slurm else None
    reattached = job is not None
    if reattached:
        print(f"cmbench: re-attaching to job {job.job_id} ({record})", file=sys.stderr)
    attempt = 0
    while True:
        if job is None:
            try:
                job = _submit(launcher, folder, f"cmbench-{cfg.run.variant}-{job_name(stage, nfe, metric)}", slurm,
                              StageJob(), stage, str(rdir), nfe, metric)
            except FailedJobError as e:
                raise _rejected(e, kind, cfg.run.suite, facts) from None
            io.write_json(record, {"job_id": job.job_id, "launcher": launcher, "config_hash": cfg.content_hash,
                                   "submitted": time.time()}, indent=None)
            print(f"cmbench: submitted job {job.job_id} ({record})", file=sys.stderr)
        if launcher != "slurm":
            break
        _wait(job, launch_cfg.poll_s, f"the {kind} job asks {_asks(facts)} (launch config: "
                                      f"suites.{cfg.run.suite}.{kind}, else jobs.{kind})")
        state = _state(job)
        if state == "CANCELLED":      # by hand or by an administrator: no result will come, and it is not ours to redo
            raise JobFailed(f"job {job.job_id} ({kind}) was cancelled (sacct -j {job.job_id})")
        why = _never_ran(job, state)
        if why is None:
            _results(job)
            if not reattached or all(p.exists() for p in stage_outputs(stage, rdir, nfe, metric, tasks)):
                break
            # Snakemake removes the outputs of a job it did not see finish just before it runs the rule again: the
            # job we re-attached to may have written them before that, while Slurm still listed it as running (and
            # may still list it so here: submitit calls a job done once its result file exists)
            print(f"cmbench: job {job.job_id} ({kind}) ended but its outputs are gone (removed by the restarted "
                  f"workflow): submitting it again", file=sys.stderr)
            job, reattached = None, False
            continue
        if attempt == RESUBMITS:
            raise JobFailed(f"job {job.job_id} ({kind}) failed before it ran ({why}), {RESUBMITS + 1} times in a "
                            f"row: the cluster cannot start it (sacct -j {job.job_id}; slurmd's log)")
        print(f"cmbench: job {job.job_id} ({kind}) failed before it ran ({why}): submitting it again "
              f"({attempt + 1} of {RESUBMITS})", file=sys.stderr)
        job, attempt = None, attempt + 1
    if launcher != "slurm":
        _results(job)
    if stage == "sample" and tasks > 1:
        from cmbench.sample import merge_shards
        merge_shards(rdir, nfe, tasks)
