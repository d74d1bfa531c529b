"""What every benchmark shares: targets and sizes, provenance (machine, git), interleaved repeats and medians,
the run configs, and the JSON records and Markdown table of a run."""
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

from cmbench import io

REPO = Path(__file__).resolve().parents[1]   # the checkout these benchmarks (and its Snakefile) come from
TARGETS = {"harness": 1.05, "sct": 2.0, "fid": 1.05, "ode_ratio": 1.0, "ode_diff": 1e-6, "toy_suite_s": 180.0,
           "eval_every": 1.15}

# steady-state windows: (warm-up steps k, timed steps W). The toy window spans two checkpoint periods and 20
# stats writes of the defaults; a digits step costs ~0.1–0.2 s, so its window is one stats period (100 steps)
# and its checkpoint saves are timed in a separate short run.
SIZES = {
    "full": {"mlp": (100, 2000), "unet": (10, 100), "repeats": 3, "net_repeats": {"mlp": 5}, "fid_n": 100,
             "ode_n": 10_000, "ode_ref_n": 200, "suite_cores": 2,
             # eval_every: (variants, dataset, train.steps; None: each variant's toy budget)
             "eval_every": (["ct", "ict", "edm", "cd", "direct_cm", "sct", "scd", "ect"], "ring2d", None)},
    "quick": {"mlp": (5, 20), "unet": (2, 3), "repeats": 1, "net_repeats": {}, "fid_n": 6, "ode_n": 400,
              "ode_ref_n": 4, "suite_cores": 2, "eval_every": (["ct"], "ring2d", 4000)},
}


# ---------------------------------------------------------------------------------------------- provenance

def machine() -> dict:
    info = {"cpu_model": None, "cpuinfo_processors": 0}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and info["cpu_model"] is None:
                info["cpu_model"] = value.strip()
            elif key.strip() == "processor":
                info["cpuinfo_processors"] += 1
    except OSError:
        pass
    info["os_cpu_count"] = os.cpu_count()
    info["platform"] = platform.platform()
    info["python"] = platform.python_version()
    try:
        mem = Path("/proc/meminfo").read_text().split("\n")[0].split()
        info["mem_total_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def machine_line(m: dict) -> str:
    return f"{m['cpu_model']}, {m['cpuinfo_processors']} processors (os.cpu_count {m['os_cpu_count']})"


def git_state(repo: Path) -> dict:
    def git(*args):
        r = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None}


# ------------------------------------------------------------------------------------------------- timing

def median(xs) -> float:
    return float(statistics.median(xs))


def interleave(repeats: int, jobs: list) -> dict[str, list]:
    """Run the (name, fn) jobs `repeats` times, A B C then C B A …; each fn returns a result dict."""
    out = {name: [] for name, _ in jobs}
    for r in range(repeats):
        for name, fn in (jobs if r % 2 == 0 else jobs[::-1]):
            out[name].append(fn())
    return out


def resolve(configs, suite, dataset, variant, overrides: dict):
    """The checked run config of seed 0, as the workflow would train it."""
    from cmbench.checks import check_run
    from cmbench.config import Experiment
    return check_run(Experiment(configs).resolve(suite, dataset, variant, 0, overrides))


# ------------------------------------------------------------------------------------------------ records

def write_record(out: Path, record: dict) -> Path:
    return io.write_text(out / f"{record['benchmark']}.json", json.dumps(record, indent=1, default=str) + "\n")


def fmt_ratio(r) -> str:
    return "—" if r is None else f"{r:.3g}"


def _fmt_target(t) -> str:
    if t is None:
        return "—"
    if "budget_s" in t:
        return f"≤ {t['budget_s']:g} s"
    return f"≤ {t['value']:g}" + (f", max abs diff ≤ {t['max_abs_diff']:g}" if "max_abs_diff" in t else "")


def table(results: list[dict], meta: dict) -> str:
    lines = [f"{meta['date'][:10]}, {machine_line(meta['machine'])}, torch {meta['torch']}, "
             f"commit {str(meta['git_commit'])[:10]}{' (dirty)' if meta['git_dirty'] else ''}", "",
             "| benchmark | measured | ratio | target | met |", "|---|---|---|---|---|"]
    for r in results:
        met = {True: "yes", False: "**no**", None: "—"}[r["met"]]
        lines.append(f"| {r['title']} | {r['measured']} | {fmt_ratio(r['ratio'])} | {_fmt_target(r['target'])} "
                     f"| {met} |")
    return "\n".join(lines)
