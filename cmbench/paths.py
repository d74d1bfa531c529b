"""Where every artifact lives: results/runs/{suite}/{dataset}/{variant}/s{seed}/..."""
from pathlib import Path


def run_dir(results: str | Path, run) -> Path:
    """run: the config's RunId (suite, dataset, variant, seed)."""
    return Path(results) / "runs" / run.suite / run.dataset / run.variant / f"s{run.seed}"


def results_of(rdir: Path) -> Path:
    """The results tree a run dir belongs to (the inverse of run_dir): where its shared references live."""
    return Path(rdir).parents[4]


def sibling_run(rdir: Path, variant: str) -> Path:
    """Another variant's run of the same suite, dataset and seed (where a student finds its teacher)."""
    rdir = Path(rdir)
    return rdir.parent.parent / variant / rdir.name


def config_file(rdir: Path) -> Path:
    """The resolved, validated config of the run and its hash, written when the workflow is planned: every
    stage reads it, none reads configs/."""
    return Path(rdir) / "config.json"


def checkpoints_dir(rdir: Path) -> Path:
    return Path(rdir) / "checkpoints"


def stats_file(rdir: Path) -> Path:
    """Training statistics, one JSON line per train.log_every steps."""
    return Path(rdir) / "stats.jsonl"


def final_weights(rdir: Path) -> Path:
    return Path(rdir) / "final.pt"


def weights_file(rdir: Path, step: int | None = None) -> Path:
    """The weights sampled: final.pt (step None), else the EMA snapshot after `step` steps (evaluate.every), kept
    beside the checkpoints (set aside with them when another config trains; never pruned)."""
    return final_weights(rdir) if step is None else checkpoints_dir(rdir) / f"ema-{step:09d}.pt"


def training_artifacts(rdir: Path) -> list[Path]:
    """What a run's training writes and carries its training hash (RunConfig.hash): set aside as a whole when
    another config trains in the run dir (cmbench.checkpoint.set_aside_other_config)."""
    return [checkpoints_dir(rdir), stats_file(rdir), final_weights(rdir)]


def set_aside(path: Path, cfg_hash: str, copy: int = 1) -> Path:
    """Where a training artifact of config cfg_hash waits while another config trains: checkpoints-<hash>/,
    stats-<hash>.jsonl, final-<hash>.pt; copy > 1 numbers further copies of the same config's."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{cfg_hash}{'' if copy == 1 else f'-{copy}'}{path.suffix}")


def jobs_dir(rdir: Path) -> Path:
    """submitit's job folders and one record per launched stage (job id, config hash): what a restart re-attaches to."""
    return Path(rdir) / "jobs"


def logs_dir(rdir: Path) -> Path:
    return Path(rdir) / "logs"


def _at(step: int | None) -> str:
    return "" if step is None else f"-step{step:09d}"


def samples_file(rdir: Path, nfe: int, step: int | None = None) -> Path:
    """The samples of the final weights (step None) or of the EMA snapshot of `step`."""
    return Path(rdir) / "samples" / f"nfe{nfe}{_at(step)}.npz"


def samples_shard(rdir: Path, nfe: int, shard: int, shards: int, step: int | None = None) -> Path:
    return Path(rdir) / "samples" / f"nfe{nfe}{_at(step)}.shard{shard}of{shards}.npz"


def slug(metric_set: str) -> str:
    """A metric set as a file-name component: 'clean-fid/clean' → 'clean-fid-clean'."""
    return metric_set.replace("/", "-")


def metrics_file(rdir: Path, nfe: int, metric_set: str = "data") -> Path:
    """The records of one metric set (RunConfig.metric_sets) at one NFE."""
    return Path(rdir) / "metrics" / f"nfe{nfe}-{slug(metric_set)}.json"


def records_file(rdir: Path) -> Path:
    """All metric records of a run (every NFE): what the report reads."""
    return Path(rdir) / "metrics" / "records.json"


def reference_file(results: str | Path, dataset: str, key: str, metric_set: str = "data") -> Path:
    """Ground truth (toy) or reference statistics (images) that depend on the dataset and the metric's
    settings, not on the run: computed once and shared."""
    prefix = "" if metric_set == "data" else slug(metric_set) + "-"
    return Path(results) / "reference" / f"{prefix}{dataset}-{key}.npz"


def lock_file(rdir: Path) -> Path:
    """Held by the process that trains or samples the run (cmbench.checkpoint.run_lock)."""
    return Path(rdir) / ".lock"
