"""toy_suite: `snakemake --cores 2 all` into a fresh results dir, end to end: wall time against the 180 s
budget, peak memory, and what the time went to (training per variant, each rule's jobs)."""
import datetime
import glob
import importlib.util
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from benchmarks.common import TARGETS
from cmbench import paths


def _snakemake_jobs(log: str) -> list[dict]:
    """(rule, wildcards, seconds) of each job from Snakemake's log: '[timestamp]' lines before 'rule X:' /
    'localrule X:' and 'Finished jobid: N (Rule: X)' (one-second resolution). Empty when the format is not
    recognised."""
    stamp, start, jobs, pending, wildcards = None, {}, [], None, {}
    for line in log.splitlines():
        s = line.strip()
        m = re.match(r"^\[(\w{3} \w{3}\s+\d+ \d\d:\d\d:\d\d \d{4})\]$", s)
        if m:
            stamp = datetime.datetime.strptime(re.sub(r"\s+", " ", m.group(1)), "%a %b %d %H:%M:%S %Y")
            continue
        m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):$", s)
        if m:
            pending, wildcards = (m.group(1), stamp), {}
            continue
        m = re.match(r"^jobid: (\d+)$", s)
        if m and pending:
            start[m.group(1)] = (*pending, wildcards)
            pending = None
            continue
        m = re.match(r"^wildcards: (.*)$", s)
        if m:
            wildcards.update(kv.split("=", 1) for kv in m.group(1).split(", ") if "=" in kv)
            continue
        m = re.match(r"^Finished job(?:id)?:? (\d+)", s)
        if m and m.group(1) in start and stamp is not None:
            rule, t0, wc = start.pop(m.group(1))
            if t0 is not None:
                jobs.append({"rule": rule, "wildcards": wc, "s": (stamp - t0).total_seconds()})
    return jobs


def _peak_memory(proc, interval: float = 1.0) -> dict:
    """Sample the summed RSS and PSS of the process tree until it exits (psutil). Each sample reads every
    process's smaps: at 0.25 s intervals that took ~8% of a core, at 1 s ~2%."""
    import psutil
    peak = {"rss_sum_mib": 0.0, "pss_sum_mib": 0.0, "processes_max": 0}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        rss = pss = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in procs:
            try:
                mi = p.memory_full_info()
                rss, pss = rss + mi.rss, pss + getattr(mi, "pss", mi.rss)
            except psutil.Error:
                pass
        peak["rss_sum_mib"] = max(peak["rss_sum_mib"], rss / 2**20)
        peak["pss_sum_mib"] = max(peak["pss_sum_mib"], pss / 2**20)
        peak["processes_max"] = max(peak["processes_max"], len(procs))
        time.sleep(interval)
    return peak


def _run_snakemake(cmd: list[str], tmp: Path, repo: Path) -> tuple[float, dict, str]:
    """Run cmd under /usr/bin/time -v (where it exists) with the memory sampler (where psutil is installed);
    the wall seconds, the sampled peaks ({} without psutil) and the log."""
    timev = Path("/usr/bin/time")
    full = ([str(timev), "-v", "-o", str(tmp / "time-v.txt")] if timev.exists() else []) + cmd
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp / "snakemake.log"
    have_psutil = importlib.util.find_spec("psutil") is not None
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(full, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT)
        peak = _peak_memory(proc) if have_psutil else {}
        rc = proc.wait()
    wall = time.perf_counter() - t0
    text = log.read_text()
    if rc != 0:
        raise RuntimeError(f"snakemake failed (exit {rc}); log: {log}\n{text[-2000:]}")
    return wall, peak, text


def _memory(tmp: Path, peak: dict) -> dict:
    memory = {"psutil_sampled": peak or None}
    if (tmp / "time-v.txt").exists():
        for line in (tmp / "time-v.txt").read_text().splitlines():
            key, _, value = line.strip().rpartition(": ")
            if key == "Maximum resident set size (kbytes)":
                memory["largest_process_maxrss_mib"] = int(value) / 1024
                memory["largest_process_source"] = "/usr/bin/time -v"
    if "largest_process_maxrss_mib" not in memory:   # a forked child counts the parent's pages until it execs
        memory["largest_process_maxrss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        memory["largest_process_source"] = "getrusage(RUSAGE_CHILDREN) (may include this process's own size)"
    return memory


def _training_time(results: Path) -> tuple[list[dict], dict]:
    """What the time went to: each run's training from its stats.jsonl (sec_per_kstep × steps of each block),
    per run and summed per variant."""
    per_run, per_variant = [], {}
    every_run = paths.run_dir(results, SimpleNamespace(suite="*", dataset="*", variant="*", seed="*"))
    for stats in sorted(map(Path, glob.glob(str(paths.stats_file(every_run))))):
        rdir = stats.parent
        prev, train_s = -1, 0.0
        for line in stats.read_text().splitlines():
            rec = json.loads(line)
            train_s += rec["sec_per_kstep"] * (rec["step"] - prev) / 1000
            prev = rec["step"]
        per_run.append({"run": str(rdir.relative_to(results)), "steps": prev + 1, "train_s": train_s})
        v = per_variant.setdefault(rdir.parent.name, {"runs": 0, "train_s": 0.0})
        v["runs"] += 1
        v["train_s"] += train_s
    return per_run, per_variant


def _job_time(log: str, per_variant: dict) -> dict:
    """Seconds per rule from Snakemake's log; adds each variant's whole run jobs (job_s) and what of them was
    not training (job_not_training_s) to per_variant."""
    per_rule = {}
    for j in _snakemake_jobs(log):
        r = per_rule.setdefault(j["rule"], {"jobs": 0, "s": 0.0})
        r["jobs"] += 1
        r["s"] += j["s"]
        v = per_variant.get(j["wildcards"].get("variant")) if j["rule"] in ("run", "train") else None
        if v is not None:       # the whole job: process start-up, training, sampling, evaluation
            v["job_s"] = v.get("job_s", 0.0) + j["s"]
    for v in per_variant.values():
        if "job_s" in v:
            v["job_not_training_s"] = v["job_s"] - v["train_s"]
    return per_rule


def bench_toy_suite(sizes: dict, repo: Path, keep: Path | None = None) -> dict:
    cores = sizes["suite_cores"]
    tmp = Path(tempfile.mkdtemp(prefix="cmbench-bench-suite-"))
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "all", "--config", f"results={tmp / 'results'}"]
    wall, peak, log = _run_snakemake(cmd, tmp, repo)
    memory = _memory(tmp, peak)
    per_run, per_variant = _training_time(tmp / "results")
    per_rule = _job_time(log, per_variant)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp / "snakemake.log", keep / "toy_suite-snakemake.log")
    shutil.rmtree(tmp, ignore_errors=True)
    train_total = sum(v["train_s"] for v in per_variant.values())
    job_total = sum(v.get("job_s", 0.0) for v in per_variant.values())
    top = sorted(per_variant.items(), key=lambda kv: -kv[1]["train_s"])
    dominant = ", ".join(f"{name} {v['train_s']:.0f} s" for name, v in top[:3])
    target = TARGETS["toy_suite_s"]
    return {
        "benchmark": "toy_suite",
        "title": f"toy suite end to end: snakemake --cores {cores} all (fresh results dir)",
        "command_run": " ".join(cmd[1:]).replace(str(tmp / "results"), "TMP"),
        "repeats": 1, "wall_s": wall, "cores": cores,
        "memory": memory,
        "memory_notes": "largest_process_maxrss_mib: the peak RSS of the largest single process in the tree "
                        "(largest_process_source says how it was read); psutil_sampled: peak over 1 s samples "
                        "of the RSS (and PSS, which splits shared pages) summed over snakemake and all its "
                        "descendants.",
        "per_variant": per_variant, "per_run": per_run, "per_rule": per_rule,
        "train_s_total": train_total, "run_jobs_s_total": job_total, "cpu_s_available": wall * cores,
        "ratio": wall / target, "target": {"op": "<=", "value": 1.0, "budget_s": target,
                                           "what": "wall seconds / 180 s"},
        "met": wall <= target,
        "measured": f"{wall:.0f} s wall; peak memory {memory['largest_process_maxrss_mib']:.0f} MiB (largest "
                    f"process)" + (f", {peak['pss_sum_mib']:.0f} MiB (all processes, PSS)" if peak else ""),
        "notes": f"{wall:.0f} s against a 180 s budget ({wall / target:.2f}×). Of the {wall * cores:.0f} "
                 f"core-seconds, run jobs (start-up, train, sample, evaluate) took {job_total:.0f} s, of which "
                 f"training {train_total:.0f} s (each run's stats.jsonl: sec_per_kstep × steps); other rules: "
                 + ", ".join(f"{k} {v['s']:.0f} s" for k, v in per_rule.items() if k not in ("run", "all"))
                 + f"; most training: {dominant}.",
    }
