"""File handling one floor down: atomic writes, content hashes, damaged files set aside, JSON lines read past a
torn line, lock files. Every module that writes a result, checkpoint or record goes through here, so that a crash
or preemption leaves the old file or the whole new one, never a torn one."""
import fcntl
import hashlib
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

from cmbench.errors import RunDirInUse


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a uniquely named temporary file beside `path`, fsync it, rename it into place and
    fsync the folder. Concurrent writers never share a temporary file; on error the temporary file is removed
    and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + "".join(path.suffixes))
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent))


def save_npz(path: str | Path, **arrays) -> Path:
    import numpy as np
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def save_torch(path: str | Path, obj) -> Path:
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:    # a file object: the archive's inner name does not depend on tmp's name
            torch.save(obj, f)
    return atomic_write(path, write)


def set_aside(path: str | Path, suffix: str | None = None) -> Path:
    """Rename a damaged file out of the way, never deleting it: PATH + suffix (default .damaged-<UTC time>).
    Returns the new name."""
    path = Path(path)
    aside = path.with_name(path.name + (suffix or f".damaged-{datetime.now(timezone.utc):%Y%m%dT%H%M%S.%fZ}"))
    os.replace(path, aside)
    return aside


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """The objects of a JSON-lines file, and how many lines were dropped: a line torn by a crash mid-write does
    not parse, and is skipped rather than failing every reader."""
    records, dropped = [], 0
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            records.append(rec)
        else:
            dropped += 1
    return records, dropped


_held: dict[str, bool] = {}     # the lock files this process holds: real path → shared


@contextmanager
def locked(path: str | Path, what: str, shared: bool = False) -> Iterator[None]:
    """Hold an fcntl.flock lock on `path` (created if absent) for the block: exclusive, or shared with other
    shared holders. A conflict raises RunDirInUse at once, naming `what` and the holder, rather than waiting:
    the holder may be a training run of days, a cluster job waiting on it would hold its allocation idle, and
    Snakemake never runs one job twice at once, so a conflict is another workflow or a hand-started command,
    for the user to resolve. The kernel drops the lock when its process ends, even on SIGKILL (no stale
    locks). Re-entrant within a process: a fused run holds its run dir while its stages take it again."""
    key = os.path.realpath(path)
    if key in _held:
        if _held[key] and not shared:
            raise RuntimeError(f"{path}: a shared lock cannot be upgraded to an exclusive one")
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "a sampler"
        os.close(fd)
        raise RunDirInUse(f"{what} is in use by {holder} (lock file {path}): wait for it to end, or stop it, "
                          f"then retry") from None
    except OSError as e:    # a file system without locks (e.g. Lustre mounted noflock): the work matters more
        os.close(fd)
        print(f"cmbench: {path}: the file system refuses locks ({e.strerror}); {what} goes unlocked",
              file=sys.stderr)
        yield
        return
    os.ftruncate(fd, 0)      # the exclusive holder, for the message of a process that finds the lock taken
    if not shared:
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    _held[key] = shared
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)        # releases the lock


def file_sha256(path: str | Path) -> str:
    """A file's SHA-256 in hex, streamed (weights files are large) and cached while the file is unchanged."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
