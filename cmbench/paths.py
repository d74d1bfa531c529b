"""Where every artifact lives: results/runs/{suite}/{dataset}/{variant}/s{seed}/..."""
from pathlib import Path

from cmbench.config import RunId


def run_dir(results: str | Path, run: RunId) -> Path:
    return Path(results) / "runs" / run.suite / run.dataset / run.variant / f"s{run.seed}"


def final_weights(rdir: Path) -> Path:
    return Path(rdir) / "final.pt"


def samples_file(rdir: Path, nfe: int) -> Path:
    return Path(rdir) / "samples" / f"nfe{nfe}.npz"


def metrics_file(rdir: Path, nfe: int) -> Path:
    return Path(rdir) / "metrics" / f"nfe{nfe}.json"


def reference_file(results: str | Path, dataset: str, key: str) -> Path:
    """Ground truth that depends on the dataset and sampler settings, not on the run: computed once."""
    return Path(results) / "reference" / f"{dataset}-{key}.npz"
