"""Run a stage of one run through submitit and block until it ends (DESIGN.md property 2).

Launchers: `inline` calls the stage in this process (no submitit; the laptop toy default, one process per
rule); `debug` is submitit's in-process DebugExecutor (drops into pdb on error: for interactive debugging);
`local` is submitit's LocalExecutor (a child process per job); `slurm` submits with sbatch through submitit,
records the job id in the run dir, and re-attaches to that job after a restart instead of submitting again."""
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import submitit

from cmbench import io, paths
from cmbench.config import LaunchConfig, RunConfig, load_run_config
from cmbench.errors import JobFailed

# a job worth waiting for. Not COMPLETED: Snakemake deletes the outputs of a job it did not see finish, so a
# finished job is run again (training resumes from its checkpoints; the other stages are short)
LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "RESIZING",
               "SUSPENDED")


def _train(rdir, nfe, metric):
    from cmbench.train.loop import train
    train(load_run_config(rdir), rdir)


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
    """On timeout or preemption submitit calls checkpoint(), which (inherited) resubmits the same call;
    training then resumes from its newest checkpoint, losing at most `train.checkpoint_every` steps.
    With several tasks, each is one torch.distributed rank of a training job (cmbench.train.distributed)."""

    def __call__(self, stage, rdir, nfe, metric="data"):
        if submitit.JobEnvironment().num_tasks > 1:
            if stage not in SPLIT_STAGES:
                raise ValueError(f"stage {stage!r} runs as one task; only {SPLIT_STAGES} are split over tasks")
            submitit.helpers.TorchDistributedEnvironment().export()
        run_stage(stage, rdir, nfe, metric)


def _slurm_parameters(launch_cfg: LaunchConfig, kind: str) -> dict:
    job = launch_cfg.jobs[kind]
    tasks = (job.tasks_per_node or max(job.gpus_per_node, 1)) if kind in ("teacher", "train", "sample") else 1
    params = {"timeout_min": job.timeout_min, "cpus_per_task": job.cpus_per_task, "mem_gb": job.mem_gb,
              "gpus_per_node": job.gpus_per_node, "tasks_per_node": tasks, "nodes": 1}
    params.update({f"slurm_{k}": v for k, v in (("partition", job.partition), ("account", job.account)) if v})
    return params


def _reattach(record: Path, folder: Path, cfg_hash: str, tasks: int):
    """The job recorded by an earlier launch of this stage, if it is still alive and runs this config;
    otherwise None."""
    if not record.exists():
        return None
    saved = json.loads(record.read_text())
    if saved.get("launcher") != "slurm" or saved.get("config_hash") != cfg_hash:
        return None
    job = submitit.SlurmJob(folder=folder, job_id=saved["job_id"], tasks=range(tasks))
    state = job.get_info(mode="force").get("State", "UNKNOWN").split()[0]
    return job if state in LIVE_STATES else None


def _wait(job, poll_s: float) -> None:
    """Poll at a modest rate (one sacct call per poll); on failure raise JobFailed with the log's tail."""
    while not job.done(force_check=True):
        time.sleep(poll_s)
    try:
        job.results()      # every task's (a training job may run one task per rank)
    except Exception as e:
        logs = sorted(Path(job.paths.folder).glob(f"{job.job_id}_*_log.err"))
        tail = "\n".join(ln for log in logs for ln in log.read_text().splitlines()[-30:])
        raise JobFailed(f"job {job.job_id} failed: {type(e).__name__}; log tail "
                        f"({', '.join(map(str, logs))}):\n{tail}") from None


def launch(stage: str, rdir: str | Path, nfe: int | None, launcher: str, launch_cfg: LaunchConfig | None = None,
           metric: str = "data") -> None:
    rdir = Path(rdir)
    cfg = load_run_config(rdir)       # a missing or damaged config.json fails here, before anything is submitted
    if launcher == "inline":
        return run_stage(stage, str(rdir), nfe, metric)
    jobs = paths.jobs_dir(rdir)
    jobs.mkdir(parents=True, exist_ok=True)
    folder, record = jobs / "%j", jobs / f"{job_name(stage, nfe, metric)}.json"
    slurm = _slurm_parameters(launch_cfg, job_kind(stage, cfg)) if launcher == "slurm" else None
    tasks = slurm["tasks_per_node"] if slurm else 1
    job = _reattach(record, folder, cfg.content_hash, tasks) if slurm else None
    if job is not None:
        print(f"cmbench: re-attaching to job {job.job_id} ({record})", file=sys.stderr)
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster=launcher)
        executor.update_parameters(name=f"cmbench-{cfg.run.variant}-{job_name(stage, nfe, metric)}")
        if slurm:
            executor.update_parameters(**slurm)
        job = executor.submit(StageJob(), stage, str(rdir), nfe, metric)
        io.write_json(record, {"job_id": job.job_id, "launcher": launcher, "config_hash": cfg.content_hash,
                               "submitted": time.time()}, indent=None)
        print(f"cmbench: submitted job {job.job_id} ({record})", file=sys.stderr)
    if launcher == "slurm":
        _wait(job, launch_cfg.poll_s)
    else:
        job.results()
    if stage == "sample" and tasks > 1:
        from cmbench.sample import merge_shards
        merge_shards(rdir, nfe, tasks)
