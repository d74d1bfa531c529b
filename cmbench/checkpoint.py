"""Checkpoint IO, below every stage that reads weights (train, teacher, sample, benchmarks): atomic writes
(cmbench.io), safe loads (weights_only), newest-valid selection."""
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


def set_aside_other_config(rdir: Path, cfg_hash: str) -> None:
    """Checkpoints, stats and final weights of another config are never mixed with this one's nor deleted: they
    are set aside under names carrying the hash of the config that wrote them."""
    old = written_by(rdir)
    if old is None or old == cfg_hash:
        return
    for p in (paths.checkpoints_dir(rdir), paths.stats_file(rdir), paths.final_weights(rdir)):
        if p.exists():
            aside = p.with_name(f"{p.stem}-{old}{p.suffix}")
            os.replace(p, aside)
            print(f"cmbench: config changed ({old} → {cfg_hash}): kept {aside}", file=sys.stderr)
