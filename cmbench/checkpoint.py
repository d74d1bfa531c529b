"""Checkpoint IO, below every stage that reads weights (train, teacher, sample, benchmarks): atomic writes
(cmbench.io), verified safe loads (CRC-32, weights_only), newest-valid selection, the run dir's lock, setting
aside (and restoring) the artifacts of another config."""
import itertools
import os
import re
import sys
import zipfile
from contextlib import AbstractContextManager
from pathlib import Path

import torch

from cmbench import io, paths
from cmbench.errors import DamagedFile

_CKPT = re.compile(r"^ckpt-(\d{9})\.pt$")
REQUIRED = ("step", "config_hash", "model", "ema", "optimizer", "generator", "torch_rng")
FINAL_REQUIRED = ("step", "config_hash", "model", "ema")
SNAPSHOT_REQUIRED = ("step", "config_hash", "ema")


def save_atomic(obj: dict, path: Path) -> None:
    """A crash at any point leaves either the old file or the complete new one, never a torn file."""
    io.save_torch(path, obj)


def load(path: Path, required: tuple[str, ...] = ()) -> dict:
    """A checkpoint (or final weights) file, verified, then loaded weights_only (tensors and plain containers,
    no arbitrary unpickling). torch.save writes a zip archive with a CRC-32 of every entry but torch.load never
    checks them, so they are checked here first: a flipped bit or torn write anywhere in the data is caught
    (CRC-32 catches every error burst up to 32 bits). The check needs no file beside the checkpoint, so a crash
    between two writes cannot leave a good file unverifiable. Raises DamagedFile (one line naming the file) for
    a file that fails, does not load or lacks a `required` entry; an absent file raises FileNotFoundError."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        state = None if bad else torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:     # not a zip archive, or not a loadable one
        raise DamagedFile(f"{path}: unreadable ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    if bad:
        raise DamagedFile(f"{path}: entry {bad} fails its CRC-32 check")
    missing = [k for k in required if k not in state] if isinstance(state, dict) else ["(not a mapping)"]
    if missing:
        raise DamagedFile(f"{path}: missing entries {missing}")
    return state


def load_final(rdir: Path, set_aside: bool = True) -> dict:
    """A run's final weights, verified. A damaged file is set aside (renamed, kept) unless `set_aside` is False
    (ranks other than 0 leave that to rank 0), so that the train stage redoes it from the run's checkpoints
    instead of every retry failing on it; the DamagedFile raised says so in one line."""
    path = paths.final_weights(rdir)
    try:
        return load(path, FINAL_REQUIRED)
    except DamagedFile as e:
        if not set_aside:
            raise
        try:
            aside = f"set aside as {io.set_aside(path).name}"
        except FileNotFoundError:        # another sampler of this run was first
            aside = "set aside by another process"
        raise DamagedFile(f"{e}; {aside}: the train stage redoes it from the run's checkpoints "
                          f"(re-run snakemake, or cmbench train --run {rdir})") from None


def run_lock(rdir: Path, shared: bool = False) -> AbstractContextManager:
    """The run dir's lock (cmbench.io.locked): exclusive to train (the stats, checkpoints and final weights
    have one writer), shared among samplers (NFEs sample in parallel, never while the run trains)."""
    return io.locked(paths.lock_file(rdir), f"run dir {rdir}", shared)


def ckpt_path(folder: Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:09d}.pt"


def list_checkpoints(folder: Path) -> list[Path]:
    """Oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _CKPT.match(p.name))


def load_latest_valid(folder: Path, at_most: int | None = None) -> tuple[dict, Path] | tuple[None, None]:
    """The newest checkpoint (of step ≤ at_most, when given) that passes its check and holds every required
    entry; damaged ones are reported and skipped (left in place: the run overwrites them when it reaches their
    step again)."""
    for path in reversed(list_checkpoints(folder)):
        if at_most is not None and int(_CKPT.match(path.name)[1]) > at_most:
            continue
        try:
            return load(path, REQUIRED), path
        except DamagedFile as e:  # a torn or corrupt file: fall back to the previous one
            print(f"cmbench: skipping unreadable checkpoint {e}", file=sys.stderr)
    return None, None


def missing_snapshots(rdir: Path, steps: list[int]) -> list[int]:
    """The steps of `steps` whose EMA snapshot (paths.weights_file) does not exist yet, oldest first."""
    return [s for s in steps if not paths.weights_file(rdir, s).is_file()]


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
