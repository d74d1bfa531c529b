"""Reading the files evaluation trusts (sample files, cached references, metric records) with one-line errors:
npz files are read without pickles and in full, and no array or record may hold NaN or infinity."""
import json
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

from cmbench import io
from cmbench.errors import DamagedFile

RESAMPLE = "delete it and re-run snakemake"


def read_npz(path: str | Path, keys, fix: str = RESAMPLE) -> dict[str, np.ndarray]:
    """Every array of an npz file, read now (np.load is lazy) and checked for the given keys and for non-finite
    floats. Anything unreadable is DamagedFile naming the file and `fix`: numpy's own messages mislead (e.g. its
    advice to pass allow_pickle=True for a file that is not an npz at all)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise DamagedFile(f"{path}: missing; re-run snakemake") from None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, AttributeError) as e:
        raise DamagedFile(f"{path}: damaged, not a readable npz file ({type(e).__name__}); {fix}") from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DamagedFile(f"{path}: damaged, it lacks {', '.join(missing)}; {fix}")
    for k, a in arrays.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise DamagedFile(f"{path}: {k} holds non-finite values (NaN or infinity); {fix}")
    return arrays


def json_field(path: str | Path, arrays: dict, key: str, fix: str = RESAMPLE):
    """A JSON string stored in an npz (e.g. a sample file's `meta`), parsed."""
    try:
        return json.loads(str(arrays[key]), parse_constant=_no_constant)
    except ValueError:
        raise DamagedFile(f"{path}: damaged, its {key} is not valid JSON; {fix}") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number a record may hold")


def write_records(path: str | Path, records: list[dict]) -> Path:
    """Metric records as JSON; NaN and infinity are refused (they are not JSON, and a table would show them)."""
    for r in records:
        for k in ("value", "ideal"):
            if isinstance(r.get(k), float) and not np.isfinite(r[k]):
                raise DamagedFile(f"{path}: {r['metric']} {k} came out {r[k]}; no record written (the inputs "
                                  f"passed their checks: report this as a bug)")
    return io.write_text(path, json.dumps(records, indent=1, allow_nan=False))


def read_records(path: str | Path) -> list[dict]:
    try:
        return json.loads(Path(path).read_text(), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path}: damaged metric records ({str(e).splitlines()[0]}); {RESAMPLE}") from None


def set_aside(path: Path, why: str) -> None:
    """Move a corrupt cached file out of the way (kept for inspection as *.corrupt) so that it is rebuilt."""
    try:
        aside = io.set_aside(path, ".corrupt")
    except FileNotFoundError:   # another evaluation set it aside first
        return
    print(f"cmbench: {path}: corrupt cached reference ({why}); set aside as {aside.name}, rebuilding it",
          file=sys.stderr)
