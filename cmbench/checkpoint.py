"""Checkpoint IO, below every stage that reads weights (train, teacher, sample, benchmarks): atomic writes
(cmbench.io), safe loads (weights_only), newest-valid selection."""
import itertools
import os
import re
import sys
from pathlib import Path

import torch

from cmbench import io, paths

_CKPT = re.compile(r"^ckpt-(\d{9})\.pt$")
REQUIRED = ("step", "config_hash", "model", "ema", "optimizer", "generator", "torch_rng")


def save_atomic(obj: dict, path: Path) -> None:
    """A crash at any point leaves either the old file or the complete new one, never a torn file."""
    io.save_torch(path, obj)


def load(path: Path) -> dict:
    """weights_only: tensors and plain containers only; no arbitrary unpickling."""
    return torch.load(path, map_location="cpu", weights_only=True)


def ckpt_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:09d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _CKPT.match(p.name))


def load_latest_valid(folder: Path) -> tuple[dict, Path] | tuple[None, None]:
    """The newest checkpoint that loads and holds every required entry; unreadable ones are reported and skipped."""
    for path in reversed(list_checkpoints(folder)):
        try:
            state = load(path)
            missing = [k for k in REQUIRED if k not in state]
            if missing:
                raise ValueError(f"missing entries {missing}")
            return state, path
        except Exception as e:  # a torn or corrupt file: fall back to the previous one
            print(f"cmbench: skipping unreadable checkpoint {path}: {type(e).__name__}: {e}", file=sys.stderr)
    return None, None


def prune(folder: Path, keep: int) -> None:
    for path in list_checkpoints(folder)[:-keep]:
        path.unlink()


def written_by(rdir: Path) -> str | None:
    """The config hash of the newest readable training artifact of a run dir (checkpoint, else final weights)."""
    for path in [*reversed(list_checkpoints(paths.checkpoints_dir(rdir))), paths.final_weights(rdir)]:
        try:
            return load(path)["config_hash"]
        except Exception:     # absent, torn or foreign: look further
            continue
    return None


def present(path: Path) -> bool:
    """A file, or a folder with something in it (an empty checkpoints folder holds nothing to keep)."""
    return path.is_file() or path.is_dir() and any(path.iterdir())


def set_aside_other_config(rdir: Path, cfg_hash: str) -> None:
    """Checkpoints, stats and final weights of another config are never mixed with this one's nor deleted: they
    are set aside under names carrying the hash of the config that wrote them (paths.set_aside), and this config's
    own, set aside by an earlier switch, move back into place, so switching back retrains nothing. A name already
    taken (a second copy of one config's artifacts) gets the next number: no sequence of switches can fail.
    Artifacts no readable checkpoint claims (a run killed before its first one) stay unless they block a return."""
    owner = written_by(rdir)
    for p in paths.training_artifacts(rdir):
        if present(p) and owner != cfg_hash and (owner is not None or present(paths.set_aside(p, cfg_hash))):
            asides = (paths.set_aside(p, owner or "unclaimed", k) for k in itertools.count(1))
            aside = next(a for a in asides if not a.exists())
            os.replace(p, aside)
            print(f"cmbench: config changed ({owner} → {cfg_hash}): kept {aside}", file=sys.stderr)
    for p in paths.training_artifacts(rdir):
        aside = paths.set_aside(p, cfg_hash)
        if present(aside) and not present(p):
            os.replace(aside, p)      # onto nothing, or onto an empty folder
            print(f"cmbench: config {cfg_hash} again: restored {p} from {aside.name}", file=sys.stderr)
