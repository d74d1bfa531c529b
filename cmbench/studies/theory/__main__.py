"""``python -m cmbench.studies.theory [OUT_DIR]``: the study with its default settings (OUT_DIR default
results/theory); prints the written paths, and the time taken on stderr."""
import sys
import time
from pathlib import Path

from cmbench.studies.theory import run_theory_study


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else Path("results/theory")
    t0 = time.perf_counter()
    for p in run_theory_study(out):
        print(p)
    print(f"theory study: {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
