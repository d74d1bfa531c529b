"""Checkpoint IO: atomic writes (tmp + fsync + rename), safe loads (weights_only), newest-valid selection."""
import os
import re
import sys
from pathlib import Path

import torch

_CKPT = re.compile(r"^ckpt-(\d{9})\.pt$")
REQUIRED = ("step", "config_hash", "model", "ema", "optimizer", "generator", "torch_rng")


def save_atomic(obj: dict, path: Path) -> None:
    """A crash at any point leaves either the old file or the complete new one, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
