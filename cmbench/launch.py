"""Run a stage of one run through submitit and block until it ends (DESIGN.md property 2).

Launchers: `inline` calls the stage in this process (no submitit; the laptop toy default, one process per
rule); `debug` is submitit's in-process DebugExecutor (drops into pdb on error: for interactive debugging);
`local` is submitit's LocalExecutor (a child process per job, logs under the run dir's jobs/ folder)."""
import json
import time
from pathlib import Path

from cmbench import paths
from cmbench.config import RunConfig

LAUNCHERS = ("inline", "debug", "local")


def _train(cfg, rdir, results, nfe):
    from cmbench.train.loop import train
    train(cfg, rdir)


def _sample(cfg, rdir, results, nfe):
    from cmbench.sample import sample_run
    sample_run(rdir, nfe)


def _evaluate(cfg, rdir, results, nfe):
    from cmbench.metrics.evaluate import evaluate_run
    evaluate_run(rdir, nfe, results)


def _reference(cfg, rdir, results, nfe):
    from cmbench.metrics.evaluate import build_reference, reference_path
    build_reference(cfg, nfe, reference_path(cfg, nfe, results))


def _collect(cfg, rdir, results, nfe):
    from cmbench.metrics.evaluate import collect_records
    collect_records(rdir)


def _run(cfg, rdir, results, nfe):
    """Every stage of a run in one process: on a laptop, starting Python and torch costs more than a toy run's
    sampling and evaluation (DESIGN.md, cost notes)."""
    _train(cfg, rdir, results, None)
    for n in cfg.sample.nfe:
        _sample(cfg, rdir, results, n)
        _evaluate(cfg, rdir, results, n)
    _collect(cfg, rdir, results, None)


STAGES = {"train": _train, "sample": _sample, "evaluate": _evaluate, "reference": _reference,
          "collect": _collect, "run": _run}
RUN_STAGES = ("train", "collect", "run")       # the stages that act on a whole run, not one NFE


def run_stage(stage: str, cfg_json: str, results: str, nfe: int | None) -> None:
    """The job function (importable, so submitit can pickle it). Takes the config as JSON, not as an object."""
    cfg = RunConfig.model_validate_json(cfg_json)
    STAGES[stage](cfg, paths.run_dir(results, cfg.run), results, nfe)


def job_name(stage: str, nfe: int | None) -> str:
    return stage if nfe is None else f"{stage}-nfe{nfe}"


def launch(stage: str, cfg: RunConfig, results: str | Path, nfe: int | None, launcher: str) -> None:
    results = str(results)
    cfg_json = json.dumps(cfg.to_dict())
    if launcher == "inline":
        return run_stage(stage, cfg_json, results, nfe)
    import submitit

    jobs = paths.run_dir(results, cfg.run) / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    executor = submitit.AutoExecutor(folder=jobs / "%j", cluster=launcher)
    executor.update_parameters(name=f"cmbench-{cfg.run.variant}-{job_name(stage, nfe)}", timeout_min=24 * 60)
    job = executor.submit(run_stage, stage, cfg_json, results, nfe)
    (jobs / f"{job_name(stage, nfe)}.json").write_text(json.dumps(
        {"job_id": job.job_id, "launcher": launcher, "config_hash": cfg.hash, "submitted": time.time()}))
    job.result()   # re-raises the job's exception (submitit adds the log tail)
