"""`python -m benchmarks [--quick] [--toy-suite] [--only NAME,...] [--out DIR]`, from the repository root."""
import argparse
import datetime
import os
import sys
from pathlib import Path

from benchmarks.common import REPO, SIZES, fmt_ratio, git_state, machine, table, write_record
from benchmarks.eval_every import bench_eval_every
from benchmarks.fid import bench_fid
from benchmarks.ode import bench_ode
from benchmarks.steps import bench_steps
from benchmarks.toy_suite import bench_toy_suite
from cmbench import io

BENCHES = ("harness", "sct", "fid", "ode", "eval_every", "toy_suite")   # the GPU check: python -m benchmarks.gpu
ORDER = ["harness_step_mlp", "harness_step_unet", "sct_vs_ict_unet", "sct_vs_ict_mlp", "fid_torch_fidelity",
         "ode_ground_truth", "eval_every", "toy_suite"]   # rows of the table


def _records(want: set, sizes: dict, configs, out: Path):
    """Each wanted benchmark's record, in turn; torch's thread count, which training sets, is restored after
    each."""
    import torch
    threads = torch.get_num_threads()
    try:
        if want & {"harness", "sct"}:
            for net in ("mlp", "unet"):
                yield from bench_steps(net, sizes, configs, want & {"harness", "sct"})
                torch.set_num_threads(threads)
        if "fid" in want:
            yield bench_fid(sizes, configs)
            torch.set_num_threads(threads)
        if "ode" in want:
            yield bench_ode(sizes, configs)
        if "eval_every" in want:
            yield bench_eval_every(sizes, configs)
            torch.set_num_threads(threads)
        if "toy_suite" in want:
            yield bench_toy_suite(sizes, REPO, keep=out)
    finally:
        torch.set_num_threads(threads)


def run(out: str | Path, command: str, toy_suite: bool = False, quick: bool = False, configs="configs",
        only: list[str] | None = None, repeats: int | None = None) -> list[Path]:
    """Run the benchmarks; one JSON each under `out` (written as each finishes), then table.md; returns the
    JSON paths."""
    import torch
    want = set(only or BENCHES)
    unknown = want - set(BENCHES)
    if unknown:
        raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHES)}")
    if not toy_suite:
        want.discard("toy_suite")
    sizes = dict(SIZES["quick" if quick else "full"])
    if repeats is not None:
        sizes["repeats"], sizes["net_repeats"] = repeats, {}
    out = Path(out)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "torch": torch.__version__, **git_state(REPO), "command": command,
            "quick": quick, "repeats": sizes["repeats"], "loadavg_start": list(os.getloadavg())}
    written, results = [], []
    for res in _records(want, sizes, configs, out):
        res = {**res, **{k: v for k, v in meta.items() if k not in res}, "loadavg_end": list(os.getloadavg())}
        written.append(write_record(out, res))
        results.append(res)
        print(f"benchmarks: {res['benchmark']}: {res['measured']} (ratio {fmt_ratio(res['ratio'])}, "
              f"met {res['met']})", file=sys.stderr, flush=True)
    results.sort(key=lambda r: ORDER.index(r["benchmark"]))
    md = table(results, meta)
    io.write_text(out / "table.md", md + "\n")
    print(md)
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description="harness cost as ratios against "
                                 "baselines timed in the same run (one JSON per benchmark, a Markdown table)")
    ap.add_argument("--out", default="results/bench", help="JSON directory (default: %(default)s)")
    ap.add_argument("--toy-suite", action="store_true", help="also time `snakemake --cores 2 all` end to end (~10 min)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: checks the plumbing, not the speed")
    ap.add_argument("--only", type=lambda s: s.split(","), default=None, metavar="NAME[,NAME]",
                    help="harness, sct, fid, ode, eval_every, toy_suite (default: all; toy_suite needs --toy-suite)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default: 3; --quick: 1)")
    ap.add_argument("--configs", default="configs", help="config directory (default: %(default)s)")
    a = ap.parse_args(argv)
    flags = [f"--out {a.out}"] + (["--toy-suite"] if a.toy_suite else []) + (["--quick"] if a.quick else []) + \
        ([f"--only {','.join(a.only)}"] if a.only else []) + ([f"--repeats {a.repeats}"] if a.repeats else [])
    for path in run(a.out, " ".join(["python -m benchmarks", *flags]), a.toy_suite, a.quick, a.configs, a.only,
                    a.repeats):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
