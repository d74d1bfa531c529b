"""Where every artifact lives: results/runs/{suite}/{dataset}/{variant}/s{seed}/..."""
from pathlib import Path

from cmbench.config import RunId


def run_dir(results: str | Path, run: RunId) -> Path:
    return Path(results) / "runs" / run.suite / run.dataset / run.variant / f"s{run.seed}"


def sibling_run(rdir: Path, variant: str) -> Path:
    """Another variant's run of the same suite, dataset and seed (where a student finds its teacher)."""
    rdir = Path(rdir)
    return rdir.parent.parent / variant / rdir.name


def final_weights(rdir: Path) -> Path:
    return Path(rdir) / "final.pt"


def samples_file(rdir: Path, nfe: int) -> Path:
    return Path(rdir) / "samples" / f"nfe{nfe}.npz"


def metrics_file(rdir: Path, nfe: int) -> Path:
    return Path(rdir) / "metrics" / f"nfe{nfe}.json"


def records_file(rdir: Path) -> Path:
    """All metric records of a run (every NFE): what the report reads."""
    return Path(rdir) / "metrics" / "records.json"


def reference_file(results: str | Path, dataset: str, key: str) -> Path:
    """Ground truth that depends on the dataset and sampler settings, not on the run: computed once."""
    return Path(results) / "reference" / f"{dataset}-{key}.npz"
