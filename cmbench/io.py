"""File handling one floor down: atomic writes, content hashes, safe loads. Every module that writes a result,
checkpoint or record goes through here, so that a crash or preemption leaves the old file or the whole new one,
never a torn one."""
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path


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
