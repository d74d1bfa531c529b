"""Progress while a suite runs: `cmbench status` (one line per run of a suite, read from its run dir and `sacct`)
and the progress line training writes to a log that has no terminal (ProgressLine).

status writes nothing and takes no lock: it reads files that their writers replace atomically (cmbench.io) or
append to (stats.jsonl, read past a torn line), so a running job never waits on it."""
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

from cmbench import io, paths
from cmbench.config import ConfigError, load_run_config

SACCT_TIMEOUT_S = 20
UNKNOWN = "unknown"


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS (days as '1 day, H:MM:SS')."""
    return str(timedelta(seconds=round(seconds)))


def per_second(rate: float | None) -> str:
    """Steps per second, whole above 100 (3 significant digits would print 2.5e+03)."""
    return "?" if not rate else f"{rate:.0f}" if rate >= 100 else f"{rate:.3g}"


def progress_text(step: int, steps: int, rate: float | None, loss: float | None) -> str:
    """'step 1200/10000 (12%) 410 it/s, ETA 0:00:21, loss 0.0132': rate in steps per second."""
    eta = clock((steps - step) / rate) if rate else "?"
    return (f"step {step}/{steps} ({100 * step // steps}%) {per_second(rate)} it/s, ETA {eta}, "
            f"loss {'?' if loss is None else f'{loss:.3g}'}")


class ProgressLine:
    """What tqdm's bar would show, as one line on stderr every `seconds` (train.progress_seconds) and after the
    last step, for a log with no terminal (tqdm turns its bar off there): steps per second since this process
    started training, and the mean loss since the previous line."""

    def __init__(self, start: int, steps: int, seconds: float):
        self.start, self.steps, self.seconds = start, steps, seconds
        self.t0 = self.shown = time.perf_counter()
        self.loss_sum, self.n = 0.0, 0

    def add(self, done: int, loss: float) -> None:
        self.loss_sum, self.n = self.loss_sum + loss, self.n + 1
        now = time.perf_counter()
        if now - self.shown < self.seconds and done < self.steps:
            return
        rate = (done - self.start) / (now - self.t0)
        print(f"cmbench: {progress_text(done, self.steps, rate, self.loss_sum / self.n)}", file=sys.stderr,
              flush=True)
        self.shown, self.loss_sum, self.n = now, 0.0, 0


@dataclass
class RunStatus:
    run: str                  # dataset/variant/s{seed}, '(teacher)' for a teacher run outside the suite
    stage: str                # not started, training, sampling k/K NFE, evaluating k/K, done
    step: int                 # training steps done (last stats line or checkpoint; all of them once final.pt exists)
    steps: int                # train.steps
    rate: float | None        # steps per second at the last stats line
    eta_s: float | None       # while training: the steps left at that rate
    loss: float | None        # the last stats line's mean loss
    updated: float | None     # when the last stats line was written (Unix time)
    job: str | None           # the newest Slurm job of the run: its stage record (jobs/<name>.json) and id
    job_id: str | None
    job_state: str | None     # sacct's state, or 'unknown' (sacct missing, failing, or not knowing the job)


def _stats(rdir: Path) -> tuple[dict, float | None]:
    """The last line of stats.jsonl and when it was written; ({}, None) before the first."""
    path = paths.stats_file(rdir)
    try:
        mtime = path.stat().st_mtime
        lines = io.read_jsonl(path)[0]
    except FileNotFoundError:
        return {}, None
    return (lines[-1], mtime) if lines else ({}, None)


def _checkpoint_step(rdir: Path) -> int:
    """The steps the newest checkpoint holds, from its name (loading it could take minutes)."""
    from cmbench.checkpoint import list_checkpoints
    found = list_checkpoints(paths.checkpoints_dir(rdir))
    return int(found[-1].stem.removeprefix("ckpt-")) if found else 0


def _slurm_job(rdir: Path) -> tuple[str, str] | None:
    """The newest Slurm job recorded in the run's jobs/ (cmbench.launch): (its record's name, its id)."""
    newest = None
    for record in sorted(paths.jobs_dir(rdir).glob("*.json")):
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):     # being replaced, or not a job record
            continue
        if isinstance(saved, dict) and saved.get("launcher") == "slurm" and "job_id" in saved:
            if newest is None or saved.get("submitted", 0) >= newest[0]:
                newest = (saved.get("submitted", 0), record.stem, str(saved["job_id"]))
    return newest[1:] if newest else None


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """Each job's state from one sacct call; {} when sacct is missing or fails (the caller says 'unknown')."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                             capture_output=True, text=True, timeout=SACCT_TIMEOUT_S, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    states = {}
    for line in out.splitlines():
        job_id, _, state = line.partition("|")
        if state.strip():
            states[job_id.strip()] = state.split()[0]     # 'CANCELLED by 1000' → CANCELLED
    return states


def run_status(rdir: str | Path, planned, evaluated: bool = True) -> RunStatus:
    """Where one run stands, from its files. Its config is the run dir's config.json, as its jobs read it (with the
    workflow's --set overrides), else `planned` (the config planning resolves now: not planned yet). A run that is
    not `evaluated` (a teacher outside the suite) is done once trained."""
    rdir = Path(rdir)
    try:
        cfg = load_run_config(rdir)
    except ConfigError:
        cfg = planned
    steps, r = cfg.train.steps, cfg.run
    last, updated = _stats(rdir)
    step = max(last["step"] + 1 if isinstance(last.get("step"), int) else 0, _checkpoint_step(rdir))
    rate = 1000 / last["sec_per_kstep"] if isinstance(last.get("sec_per_kstep"), (int, float)) \
        and last["sec_per_kstep"] > 0 else None
    nfes = cfg.sample.nfe
    if paths.records_file(rdir).exists() or not evaluated and paths.final_weights(rdir).exists():
        stage, step = "done", steps
    elif paths.final_weights(rdir).exists():
        step = steps
        sampled = sum(paths.samples_file(rdir, n).exists() for n in nfes)
        metrics = [paths.metrics_file(rdir, n, m) for n in nfes for m in cfg.metric_sets()]
        stage = (f"sampling {sampled}/{len(nfes)} NFE" if sampled < len(nfes) else
                 f"evaluating {sum(f.exists() for f in metrics)}/{len(metrics)}")
    else:
        stage = "training" if step or updated is not None else "not started"
    job = _slurm_job(rdir)
    return RunStatus(f"{r.dataset}/{r.variant}/s{r.seed}" + ("" if evaluated else " (teacher)"), stage, step, steps,
                     rate, (steps - step) / rate if stage == "training" and rate else None, last.get("loss"),
                     updated, *(job or (None, None)), None)


def suite_status(suite: str, configs: str = "configs", results: str | None = None, scale: str | None = None,
                 overrides: list[str] | None = None) -> list[RunStatus]:
    """Every run of a suite as the workflow plans it (cmbench.workflow.Plan, with the same --config values:
    results, scale, set), then the Slurm states of their jobs in one sacct call."""
    from cmbench.workflow import Plan
    config = {"suite": suite, "configs": configs, "set": overrides or []}
    config.update({k: v for k, v in (("results", results), ("scale", scale)) if v is not None})
    plan = Plan.from_snakemake(config)
    rows = [run_status(rdir, cfg, evaluated=rdir in plan.runs)
            for rdir, cfg in {**plan.runs, **plan.teacher_runs}.items()]
    states = slurm_states(sorted({r.job_id for r in rows if r.job_id}))
    for r in rows:
        if r.job_id:
            r.job_state = states.get(r.job_id, UNKNOWN)
    return rows


def table(rows: list[RunStatus], now: float | None = None) -> str:
    """The rows as an aligned text table."""
    now = time.time() if now is None else now
    head = ("run", "stage", "step", "it/s", "ETA", "loss", "updated", "job")
    cells = [head] + [(
        r.run, r.stage, f"{r.step}/{r.steps}", per_second(r.rate) if r.rate else "-",
        clock(r.eta_s) if r.eta_s is not None else "-", f"{r.loss:.3g}" if r.loss is not None else "-",
        f"{clock(now - r.updated)} ago" if r.updated is not None else "-",
        f"{r.job} {r.job_id} {r.job_state}" if r.job_id else "-") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def as_json(rows: list[RunStatus]) -> str:
    return json.dumps([asdict(r) for r in rows], indent=1)
