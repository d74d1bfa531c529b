"""`cmbench bench`: what the harness costs, measured as ratios against a baseline timed in the same run.

Each figure is a ratio of two timings taken in one process, interleaved (A B A B …, the order reversed on
every other repeat) and reduced by medians, so it holds on a noisy machine where absolute seconds do not.
One JSON per benchmark goes to `--out` (default results/bench/), each with the date, the machine, torch and
git versions, the command, the raw timings, the repeats, the ratio, its target and whether it was met; the
Markdown table of the run is printed (and written to `table.md` beside them).

    harness_step_{mlp,unet}   cmbench.train.loop.train vs a bare PyTorch loop of the same model, loss object,
                              data sampler, optimizer and EMA update (target ≤ 1.05). Steady state: the time
                              of steps k..K of one run (start-up and the final save excluded), read from a
                              clock around the loop's step iterator. The harness runs at the config's
                              checkpoint_every and log_every; checkpoint saves are timed on their own and
                              charged at one per checkpoint_every steps.
    sct_vs_ict_{unet,mlp}     harness sCT step vs harness iCT step on the same network (target ≤ 2.0).
    fid_torch_fidelity        cmbench.metrics.evaluate.evaluate_run vs torch_fidelity.calculate_metrics on the
                              same generated and reference images (target ≤ 1.05), cold (no reference
                              statistics cached on either side) and warm (both cached).
    ode_ground_truth          exact PF-ODE map of 10k ring2d points vs scipy solve_ivp called per point.
    toy_suite                 `snakemake --cores 2 all` into a fresh results dir (only with --toy-suite).
    gpu_ddpmpp                DDPM++ CIFAR-10 training and 1-step sampling images/s (only with CUDA).

Timed assertions belong here, never in the tests.
"""
from __future__ import annotations

import copy
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

TARGETS = {"harness": 1.05, "sct": 2.0, "fid": 1.05, "ode_ratio": 1.0, "ode_diff": 1e-6, "toy_suite_s": 180.0}
BENCHES = ("harness", "sct", "fid", "ode", "toy_suite", "gpu")

# steady-state windows: (warm-up steps k, timed steps W). The toy window spans two checkpoint periods and 20
# stats writes of the defaults; a digits step costs ~0.1–0.2 s, so its window is one stats period (100 steps)
# and its checkpoint saves are timed in a separate short run.
SIZES = {
    "full": {"mlp": (100, 2000), "unet": (10, 100), "repeats": 3, "net_repeats": {"mlp": 5}, "fid_n": 100,
             "ode_n": 10_000, "ode_ref_n": 200, "gpu_steps": (10, 40), "suite_cores": 2},
    "quick": {"mlp": (5, 20), "unet": (2, 3), "repeats": 1, "net_repeats": {}, "fid_n": 6, "ode_n": 400,
              "ode_ref_n": 4, "gpu_steps": (2, 3), "suite_cores": 2},
}
NETS = {  # key: (suite, dataset, what)
    "mlp": ("toy", "ring2d", "toy MLP (ring2d, batch 512)"),
    "unet": ("digits", "digits", "digits U-Net (8×8, batch 64)"),
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


def _median(xs):
    return float(statistics.median(xs))


def _interleave(repeats: int, jobs: list) -> dict[str, list]:
    """Run the (name, fn) jobs `repeats` times, A B C then C B A …; each fn returns a result dict."""
    out = {name: [] for name, _ in jobs}
    for r in range(repeats):
        for name, fn in (jobs if r % 2 == 0 else jobs[::-1]):
            out[name].append(fn())
    return out


# -------------------------------------------------------------------------------------- training steps

@contextmanager
def _clocked_loop():
    """Time the harness loop from outside: a tqdm whose iterator stamps the start of every step (and the end
    of the last), and a timer around each checkpoint write (save_atomic + prune). Restored on exit."""
    import tqdm as tqdm_module

    from cmbench.train import checkpoint, loop
    stamps, saves = [], []
    real_save, real_prune, real_tqdm = checkpoint.save_atomic, checkpoint.prune, loop.tqdm
    base = real_tqdm if isinstance(real_tqdm, type) else tqdm_module.tqdm

    class Clock(base):
        def __iter__(self):
            for x in super().__iter__():
                stamps.append(time.perf_counter())
                yield x
            stamps.append(time.perf_counter())

    def save_atomic(obj, path):
        t0 = time.perf_counter()
        real_save(obj, path)
        if Path(path).name.startswith("ckpt-"):
            saves.append([t0, time.perf_counter() - t0])

    def prune(folder, keep):
        t0 = time.perf_counter()
        real_prune(folder, keep)
        if saves:
            saves[-1][1] += time.perf_counter() - t0

    loop.tqdm, checkpoint.save_atomic, checkpoint.prune = Clock, save_atomic, prune
    try:
        yield stamps, saves
    finally:
        loop.tqdm, checkpoint.save_atomic, checkpoint.prune = real_tqdm, real_save, real_prune


def _resolve(configs, suite, dataset, variant, overrides: dict):
    from cmbench.config import Experiment
    from cmbench.workflow import check_run
    return check_run(Experiment(configs).resolve(suite, dataset, variant, 0, overrides))


def harness_run(cfg, k: int) -> dict:
    """Train cfg with cmbench.train.loop.train in a fresh run dir; the times of steps k..steps and of each
    checkpoint save."""
    from cmbench.train import checkpoint, loop
    with tempfile.TemporaryDirectory(prefix="cmbench-bench-") as d, _clocked_loop() as (stamps, saves):
        final = loop.train(cfg, Path(d) / "run", progress=False)
        weights = checkpoint.load(final)["model"]
    n = cfg.train.steps
    assert len(stamps) == n + 1, (len(stamps), n)
    lo, hi = stamps[k], stamps[n]
    inside = [s for t0, s in saves if lo <= t0 <= hi]
    return {"window_s": hi - lo, "steps": n - k, "saves_in_window_s": inside,
            "save_s": [s for _, s in saves], "weights": weights}


def bare_run(cfg, k: int) -> dict:
    """What a researcher writes by hand for the same step: the same network (build_model), loss object
    (losses.build), data sampler, optimizer and EMA update; no checkpoints, stats, NaN guards or Draws."""
    import torch

    from cmbench import losses
    from cmbench.data import make_data
    from cmbench.nets import build_model
    t = cfg.train
    torch.set_num_threads(t.threads)
    data = make_data(cfg.dataset)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg).train()
    loss_fn = losses.build(cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    target = copy.deepcopy(model).requires_grad_(False) if loss_fn.target_ema(0) is not None else None
    params = list(model.parameters()) + (list(loss_fn.module.parameters()) if loss_fn.module is not None else [])
    o = cfg.optim
    opt = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[o.name](params, lr=o.lr, betas=tuple(o.betas),
                                                                           eps=o.eps)
    g = torch.Generator().manual_seed(cfg.run.seed)
    stamps = []
    for step in range(t.steps):
        stamps.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        x0 = data.sample_torch(t.batch, g)
        loss = loss_fn(model, target if target is not None else model, x0, step, g).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - t.ema_decay)
            if target is not None:
                mu = loss_fn.target_ema(step)
                for e, p in zip(target.parameters(), model.parameters()):
                    e.lerp_(p, 1 - mu)
    stamps.append(time.perf_counter())
    return {"window_s": stamps[-1] - stamps[k], "steps": t.steps - k, "weights": model.state_dict()}


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[key].float() - b[key].float()).abs().max()) if a[key].numel() else 0.0 for key in a)


def bench_steps(net: str, sizes: dict, configs, want: set) -> list[dict]:
    """Benchmarks 1 and 2 for one network, from one interleaved sequence of runs."""
    import torch
    suite, dataset, what = NETS[net]
    k, w = sizes[net]
    ict = _resolve(configs, suite, dataset, "ict", {"train": {"steps": k + w}})
    # sCT on images starts from the suite's trained EDM teacher; its step costs the same from scratch, which
    # needs no teacher run
    scratch = {"teacher": None, "precond": {"trigflow_net": "trigflow"}} if net == "unet" else {}
    sct = _resolve(configs, suite, dataset, "sct", {"train": {"steps": k + w}, **scratch})
    ce, le = ict.train.checkpoint_every, ict.train.log_every
    threads = torch.get_num_threads()
    # untimed warm-up, which also times checkpoint saves of each variant (a save every step)
    save_s = {}
    for name, cfg in (("ict", ict), ("sct", sct)):
        if name == "sct" and "sct" not in want:
            continue
        short = _resolve(configs, suite, dataset, name, {"train": {"steps": 4, "checkpoint_every": 1},
                                                        **(scratch if name == "sct" else {})})
        save_s[name] = harness_run(short, 0)["save_s"]
    if "harness" in want:
        bare_run(_resolve(configs, suite, dataset, "ict", {"train": {"steps": min(k + w, 20)}}), 0)
    jobs = [("harness_ict", lambda: harness_run(ict, k))]
    if "harness" in want:
        jobs.append(("bare_ict", lambda: bare_run(ict, k)))
    if "sct" in want:
        jobs.append(("harness_sct", lambda: harness_run(sct, k)))
    repeats = sizes["net_repeats"].get(net, sizes["repeats"])
    runs = _interleave(repeats, jobs)
    torch.set_num_threads(threads)

    def per_step(r, saves):
        """Window time per step with the in-window saves replaced by the median save charged once per
        checkpoint_every steps (the same thing when the window spans whole checkpoint periods)."""
        return (r["window_s"] - sum(r.get("saves_in_window_s", []))) / r["steps"] + (
            _median(saves) / ce if saves is not None else 0.0)

    out = []
    hs = {name: [s for r in runs["harness_" + name] for s in r["save_s"]] + save_s[name]
          for name in ("ict", "sct") if "harness_" + name in runs}
    h_ict = [per_step(r, hs["ict"]) for r in runs["harness_ict"]]
    common = {"repeats": repeats, "network": what, "suite": suite, "dataset": dataset,
              "window": {"warmup_steps": k, "timed_steps": w},
              "checkpoint_every": ce, "log_every": le, "train_threads": ict.train.threads,
              "batch": ict.train.batch}
    if "harness" in want:
        b_ict = [per_step(r, None) for r in runs["bare_ict"]]
        diff = max(_max_abs_diff(h["weights"], b["weights"]) for h, b in zip(runs["harness_ict"], runs["bare_ict"]))
        ratio = _median(h_ict) / _median(b_ict)
        out.append({
            "benchmark": f"harness_step_{net}",
            "title": f"harness training step vs bare PyTorch loop, {what}, iCT",
            **common,
            "baseline": "bare loop: same build_model network, losses.build loss object, data sampler, optimizer, "
                        "per-parameter EMA lerp; no checkpoints, stats, NaN guards, Draws",
            "timings": {"harness_s_per_step": h_ict, "bare_s_per_step": b_ict,
                        "harness_window_s": [r["window_s"] for r in runs["harness_ict"]],
                        "harness_saves_in_window_s": [r["saves_in_window_s"] for r in runs["harness_ict"]],
                        "bare_window_s": [r["window_s"] for r in runs["bare_ict"]],
                        "checkpoint_save_s": hs["ict"],
                        "pair_ratios": [a / b for a, b in zip(h_ict, b_ict)]},
            "harness_ms_per_step": 1e3 * _median(h_ict), "bare_ms_per_step": 1e3 * _median(b_ict),
            "checkpoint_ms_per_step": 1e3 * _median(hs["ict"]) / ce,
            "final_weights_max_abs_diff": diff,
            "ratio": ratio, "target": {"op": "<=", "value": TARGETS["harness"]},
            "met": ratio <= TARGETS["harness"],
            "measured": f"{1e3 * _median(h_ict):.3g} vs {1e3 * _median(b_ict):.3g} ms/step",
            "notes": f"steady state: steps {k}..{k + w} of a {k + w}-step run, harness at checkpoint_every {ce}, "
                     f"log_every {le}; final weights of the two loops differ by at most {diff:.3g} "
                     f"(0: the same computation).",
        })
    if "sct" in want:
        s = [per_step(r, hs["sct"]) for r in runs["harness_sct"]]
        ratio = _median(s) / _median(h_ict)
        out.append({
            "benchmark": f"sct_vs_ict_{net}",
            "title": f"sCT step vs iCT step, {what}, both through the harness",
            **common,
            "baseline": "harness iCT step on the same network (sCT: TrigFlow wrapper, forward-mode JVP via "
                        "torch.func, adaptive weighting module)",
            "timings": {"sct_s_per_step": s, "ict_s_per_step": h_ict,
                        "pair_ratios": [a / b for a, b in zip(s, h_ict)]},
            "sct_ms_per_step": 1e3 * _median(s), "ict_ms_per_step": 1e3 * _median(h_ict),
            "ratio": ratio, "target": {"op": "<=", "value": TARGETS["sct"]}, "met": ratio <= TARGETS["sct"],
            "measured": f"{1e3 * _median(s):.3g} vs {1e3 * _median(h_ict):.3g} ms/step",
            "notes": f"harness per-step times, steps {k}..{k + w}, checkpoint saves charged per checkpoint_every.",
        })
    return out


# ------------------------------------------------------------------------------------------------------ FID

def _tf_dataset(x: np.ndarray):
    import torch

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return torch.from_numpy(np.ascontiguousarray(x[i].transpose(2, 0, 1)))

    return Images()


def bench_fid(sizes: dict, configs) -> dict:
    import torch
    import torch_fidelity

    from cmbench import paths
    from cmbench.data import make_data
    from cmbench.metrics import fid
    from cmbench.metrics.evaluate import evaluate_run
    from cmbench.sample import sample_run
    from cmbench.train import loop
    n = sizes["fid_n"]
    with tempfile.TemporaryDirectory(prefix="cmbench-bench-fid-") as tmp:
        tmp = Path(tmp)
        weights = fid.write_random_inception(tmp / "weights" / fid.TF_WEIGHTS)
        old_env = os.environ.get(fid.WEIGHTS_ENV)
        os.environ[fid.WEIGHTS_ENV] = str(weights.parent)
        try:
            cfg = _resolve(configs, "bench", "patches", "ict", {
                "train": {"steps": 2}, "dataset": {"size": n}, "sample": {"n": n, "batch": n},
                "evaluate": {"pixel_fd": False, "fid": ["torch-fidelity"]}})
            results = tmp / "results"
            rdir = paths.run_dir(results, cfg.run)
            loop.train(cfg, rdir, progress=False)
            torch.set_num_threads(os.cpu_count() or 1)   # the training loop set its own thread count
            samples = sample_run(rdir, 1)
            batch = cfg.evaluate.batch

            def fresh_process():
                """What a new evaluation job starts without: cmbench's in-process caches of the network and of
                the weights file's sha256."""
                fid._tf_extractor.cache_clear()
                fid._sha256.cache_clear()

            def cmbench_eval(cold: bool):
                def fn():
                    if cold:
                        shutil.rmtree(results / "reference", ignore_errors=True)
                    fresh_process()
                    t0 = time.perf_counter()
                    out = evaluate_run(rdir, 1, results, "torch-fidelity")
                    dt = time.perf_counter() - t0
                    return {"s": dt, "value": json.loads(out.read_text())[0]["value"]}
                return fn

            def direct(cached: bool):
                def fn():
                    t0 = time.perf_counter()
                    with np.load(samples) as z:
                        gen = z["images"]
                    ref = make_data(cfg.dataset).images_uint8()
                    kw = {"input2_cache_name": "bench-patches-ref", "cache_root": str(tmp / "tf-cache"),
                          "cache": True} if cached else {"cache": False}
                    m = torch_fidelity.calculate_metrics(
                        input1=_tf_dataset(gen), input2=_tf_dataset(ref), fid=True, batch_size=batch,
                        feature_extractor_weights_path=str(weights), save_cpu_ram=True, cuda=False,
                        verbose=False, **kw)
                    return {"s": time.perf_counter() - t0, "value": float(m["frechet_inception_distance"])}
                return fn

            direct(True)()    # fills torch-fidelity's own cache of the reference statistics (untimed)
            cmbench_eval(True)()   # warm-up of both paths (untimed)
            runs = _interleave(sizes["repeats"], [("cmbench_cold", cmbench_eval(True)),
                                                   ("direct_cold", direct(False)),
                                                   ("cmbench_warm", cmbench_eval(False)),
                                                   ("direct_warm", direct(True))])
        finally:
            if old_env is None:
                os.environ.pop(fid.WEIGHTS_ENV, None)
            else:
                os.environ[fid.WEIGHTS_ENV] = old_env
    t = {key: [r["s"] for r in v] for key, v in runs.items()}
    med = {key: _median(v) for key, v in t.items()}
    values = {key: v[0]["value"] for key, v in runs.items()}
    cold, warm = med["cmbench_cold"] / med["direct_cold"], med["cmbench_warm"] / med["direct_warm"]
    rel = max(abs(v - values["direct_cold"]) / abs(values["direct_cold"]) for v in values.values())
    target = TARGETS["fid"]
    return {
        "benchmark": "fid_torch_fidelity",
        "title": "FID through cmbench (evaluate_run) vs torch_fidelity.calculate_metrics",
        "images": {"generated": n, "reference": n, "shape": "32×32×3 uint8 (patches dataset; a 2-step iCT run)"},
        "weights": "He-initialised InceptionV3 of the real architecture (cmbench.metrics.fid.write_random_inception): "
                   "same cost as the real weights, meaningless values",
        "torch_threads": torch.get_num_threads(), "batch_size": batch,
        "includes": "both sides: loading the sample npz and the reference images, building the Inception network "
                    "from the weights file, features, statistics and the Fréchet distance. cmbench also: config, "
                    "seed check, weights sha256, the metric record (and, cold, writing the reference cache). "
                    "Each cmbench call starts with its in-process caches cleared, as a new job does.",
        "comparisons": {
            "cold": {"what": "no reference statistics cached on either side: both compute reference and generated "
                             "features", "ratio": cold, "target": {"op": "<=", "value": target},
                     "met": cold <= target},
            "warm": {"what": "reference statistics cached on both sides (cmbench's results/reference file; "
                             "torch-fidelity's input2_cache_name)", "ratio": warm,
                     "target": {"op": "<=", "value": target}, "met": warm <= target},
            "cmbench_warm_vs_direct_uncached": {"what": "what a user sees: cmbench with its cached reference vs a "
                                                        "plain torch-fidelity call", "ratio":
                                                med["cmbench_warm"] / med["direct_cold"], "target": None,
                                                "met": None},
        },
        "timings": {key + "_s": v for key, v in t.items()},
        "fid_values": values, "fid_max_rel_diff": rel,
        "ratio": cold, "target": {"op": "<=", "value": target}, "met": cold <= target and warm <= target,
        "measured": f"cold {med['cmbench_cold']:.3g} vs {med['direct_cold']:.3g} s; "
                    f"warm {med['cmbench_warm']:.3g} vs {med['direct_warm']:.3g} s",
        "notes": f"ratio is the cold (like-for-like, nothing cached) one; warm ratio {warm:.3f}; met needs both. "
                 f"FID values agree to {rel:.1e} relative.",
    }


# ----------------------------------------------------------------------------------------------- ODE map

def _reference_flow(mix, x, sigma_from: float, sigma_to: float, rtol: float, atol: float) -> np.ndarray:
    """The exact map of one point by scipy's solve_ivp (DOP853), its own denoiser: the reference for the
    vectorised integrator. Same ODE in the same variable: dx/ds = ln(σ_to/σ_from)·(x − D(x, σ(s))),
    ln σ(s) = (1 − s) ln σ_from + s ln σ_to."""
    from scipy.integrate import solve_ivp
    means, var0, logw, d = mix.means, mix.stds**2, np.log(mix.weights), mix.means.shape[1]
    la, lb = math.log(sigma_from), math.log(sigma_to)

    def denoise(y, sigma):
        var = var0 + sigma * sigma
        diff = y - means                                        # [K, d]
        logp = logw - 0.5 * ((diff * diff).sum(1) / var + d * np.log(2 * np.pi * var))
        p = np.exp(logp - logp.max())
        p /= p.sum()
        return p @ (means + (var0 / var)[:, None] * diff)

    def rhs(s, y):
        return (lb - la) * (y - denoise(y, math.exp(la + s * (lb - la))))

    sol = solve_ivp(rhs, (0.0, 1.0), np.asarray(x, dtype=np.float64), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(sol.message)
    return sol.y[:, -1]


def bench_ode(sizes: dict, configs) -> dict:
    from cmbench.config import Experiment
    from cmbench.data import toy
    from cmbench.seeds import initial_noise
    n, m = sizes["ode_n"], sizes["ode_ref_n"]
    cfg = Experiment(configs).resolve("toy", "ring2d", "ict", 0, {"sample": {"n": n}})
    mix = toy.make_toy(cfg.dataset.model_dump())
    sigma_from, sigma_to = cfg.sigma_list(1)[0], cfg.precond.sigma_min
    x = initial_noise(cfg, 1).astype(np.float64)            # the suite's x_T: 10k seeds, σ 80
    full = []
    for _ in range(sizes["repeats"]):
        t0 = time.perf_counter()
        exact = mix.consistency_map(x, sigma_from, sigma_to)
        full.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = np.stack([_reference_flow(mix, x[i], sigma_from, sigma_to, toy.RTOL, toy.ATOL) for i in range(m)])
    ref_s = time.perf_counter() - t0
    diff = float(np.abs(ref - exact[:m]).max())
    extrapolated = ref_s * n / m
    ratio = _median(full) / extrapolated
    met = ratio <= TARGETS["ode_ratio"] and diff <= TARGETS["ode_diff"]
    return {
        "benchmark": "ode_ground_truth",
        "title": f"exact PF-ODE map of {n} ring2d points (σ {sigma_from:g} → {sigma_to:g})",
        "method": f"cmbench.data.toy.GaussianMixture.consistency_map: one vectorised DOP853 system in ln σ, "
                  f"rtol = atol = {toy.RTOL:g}",
        "baseline": f"scipy solve_ivp (DOP853, same ODE in ln σ, same tolerances) called per point with its own "
                    f"mixture denoiser, timed on the first {m} points and extrapolated linearly to {n}",
        "points": n, "reference_points": m,
        "timings": {"cmbench_s": full, "reference_subset_s": ref_s, "reference_extrapolated_s": extrapolated},
        "cmbench_s": _median(full), "max_abs_diff": diff,
        "ratio": ratio,
        "target": {"op": "<=", "value": TARGETS["ode_ratio"], "max_abs_diff": TARGETS["ode_diff"],
                   "source": "issue #7 sets none; recorded: no slower than the per-point reference, and the 1e-6 "
                             "accuracy target of cmbench/data/toy.py"},
        "met": met,
        "measured": f"{_median(full):.3g} s vs {extrapolated:.3g} s (extrapolated), max abs Δ {diff:.1e}",
        "notes": f"reference extrapolated from {m} points; max abs difference of the two maps on those points "
                 f"{diff:.2e}.",
    }


# -------------------------------------------------------------------------------------------- toy suite

def _snakemake_jobs(log: str) -> list[dict]:
    """(rule, wildcards, seconds) of each job from Snakemake's log: '[timestamp]' lines before 'rule X:' /
    'localrule X:' and 'Finished jobid: N (Rule: X)' (one-second resolution). Empty when the format is not
    recognised."""
    import re
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


def bench_toy_suite(sizes: dict, repo: Path, keep: Path | None = None) -> dict:
    import resource
    cores = sizes["suite_cores"]
    tmp = Path(tempfile.mkdtemp(prefix="cmbench-bench-suite-"))
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(cores), "all", "--config", f"results={tmp / 'results'}"]
    timev = Path("/usr/bin/time")
    full = ([str(timev), "-v", "-o", str(tmp / "time-v.txt")] if timev.exists() else []) + cmd
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp / "snakemake.log"
    try:
        import psutil  # noqa: F401
        have_psutil = True
    except ImportError:
        have_psutil = False
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(full, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT)
        peak = _peak_memory(proc) if have_psutil else {}
        rc = proc.wait()
    wall = time.perf_counter() - t0
    text = log.read_text()
    if rc != 0:
        raise RuntimeError(f"snakemake failed (exit {rc}); log: {log}\n{text[-2000:]}")
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
    # what the time went to: each run's training from its stats.jsonl (sec_per_kstep × steps of each block)
    per_run, per_variant = [], {}
    for stats in sorted((tmp / "results" / "runs").glob("*/*/*/s*/stats.jsonl")):
        rdir = stats.parent
        prev, train_s = -1, 0.0
        for line in stats.read_text().splitlines():
            rec = json.loads(line)
            train_s += rec["sec_per_kstep"] * (rec["step"] - prev) / 1000
            prev = rec["step"]
        span = None
        rec_file, conf = rdir / "metrics" / "records.json", rdir / "config.json"
        if rec_file.exists() and conf.exists():
            span = rec_file.stat().st_mtime - conf.stat().st_mtime
        variant = rdir.parent.name
        per_run.append({"run": str(rdir.relative_to(tmp / "results")), "steps": prev + 1, "train_s": train_s,
                        "job_after_start_s": span})
        v = per_variant.setdefault(variant, {"runs": 0, "train_s": 0.0, "job_after_start_s": 0.0})
        v["runs"] += 1
        v["train_s"] += train_s
        v["job_after_start_s"] += span or 0.0
    jobs = _snakemake_jobs(text)
    per_rule = {}
    for j in jobs:
        r = per_rule.setdefault(j["rule"], {"jobs": 0, "s": 0.0})
        r["jobs"] += 1
        r["s"] += j["s"]
        v = per_variant.get(j["wildcards"].get("variant")) if j["rule"] in ("run", "train") else None
        if v is not None:       # the whole job: process start-up, training, sampling, evaluation
            v["job_s"] = v.get("job_s", 0.0) + j["s"]
    for v in per_variant.values():
        if "job_s" in v:
            v["job_not_training_s"] = v["job_s"] - v["train_s"]
    train_total = sum(v["train_s"] for v in per_variant.values())
    job_total = sum(v.get("job_s", 0.0) for v in per_variant.values())
    top = sorted(per_variant.items(), key=lambda kv: -kv[1]["train_s"])
    target = TARGETS["toy_suite_s"]
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(log, keep / "toy_suite-snakemake.log")
    shutil.rmtree(tmp, ignore_errors=True)
    dominant = ", ".join(f"{name} {v['train_s']:.0f} s" for name, v in top[:3])
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


# ------------------------------------------------------------------------------------------------------ GPU

def bench_gpu(sizes: dict, configs) -> dict:
    import torch
    base = {"benchmark": "gpu_ddpmpp", "repeats": 1,
            "title": "DDPM++ CIFAR-10 (55.7M) iCT training and 1-step sampling images/s, batch 128",
            "ratio": None, "target": None}
    if not torch.cuda.is_available():
        return {**base, "skipped": "no GPU (torch.cuda.is_available() is False)", "met": None,
                "measured": "skipped: no GPU", "timings": {}}
    from cmbench import losses
    from cmbench.config import UNetNet
    from cmbench.nets.precond import Precond
    from cmbench.nets.unet import build_unet
    from cmbench.train.loop import build_optimizer
    dev = torch.device("cuda")
    cfg = _resolve(configs, "bench", "patches", "ict", {"optim": {"name": "radam", "lr": 1.0e-4}})   # CIFAR shape
    p = cfg.precond
    model = Precond(build_unet(UNetNet(name="unet"), (3, 32, 32)), p.sigma_data, p.sigma_min, boundary=True)
    model = model.to(dev).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    loss_fn = losses.build(cfg)
    opt = build_optimizer(cfg, model.parameters())
    g = torch.Generator(dev).manual_seed(0)
    batch, (warm, steps) = 128, sizes["gpu_steps"]
    x0 = torch.rand(batch, 3, 32, 32, device=dev, generator=g) * 2 - 1
    ema_p, model_p = list(ema.parameters()), list(model.parameters())

    def step(k):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, model, x0, k, g).mean().backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_p, model_p, 1 - cfg.train.ema_decay)

    for k in range(warm):
        step(k)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(steps):
        step(warm + k)
    torch.cuda.synchronize()
    train_s = time.perf_counter() - t0
    model.eval()
    sample_batch, sample_reps = 512, max(steps // 4, 2)
    z = torch.randn(sample_batch, 3, 32, 32, device=dev, generator=g)
    sigma = torch.tensor(p.sigma_max, device=dev)
    with torch.no_grad():
        for _ in range(2):
            model(z * p.sigma_max, sigma)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(sample_reps):
            model(z * p.sigma_max, sigma)
        torch.cuda.synchronize()
    sample_s = time.perf_counter() - t0
    train_ips, sample_ips = batch * steps / train_s, sample_batch * sample_reps / sample_s
    return {**base, "device": torch.cuda.get_device_name(), "params": sum(q.numel() for q in model.parameters()),
            "timings": {"train_s": train_s, "train_steps": steps, "warmup_steps": warm, "sample_s": sample_s,
                        "sample_batches": sample_reps, "sample_batch": sample_batch},
            "train_images_per_s": train_ips, "sample_images_per_s": sample_ips, "met": None,
            "measured": f"train {train_ips:.0f} img/s, 1-step sampling {sample_ips:.0f} img/s",
            "notes": "fp32, random images in [-1, 1] (throughput does not depend on the data); no target in "
                     "issue #7."}


# -------------------------------------------------------------------------------------------------- driver

def _fmt_ratio(r):
    return "—" if r is None else f"{r:.3g}"


def _fmt_target(t):
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
        lines.append(f"| {r['title']} | {r['measured']} | {_fmt_ratio(r['ratio'])} | {_fmt_target(r['target'])} "
                     f"| {met} |")
    return "\n".join(lines)


def run(out: str | Path = "results/bench", toy_suite: bool = False, quick: bool = False, configs="configs",
        only: list[str] | None = None, repeats: int | None = None, command: str | None = None) -> list[Path]:
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
    out.mkdir(parents=True, exist_ok=True)
    repo = Path.cwd()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "torch": torch.__version__, **git_state(repo),
            "command": command or "cmbench bench " + " ".join(sys.argv[2:]), "quick": quick,
            "repeats": sizes["repeats"], "loadavg_start": list(os.getloadavg())}
    threads = torch.get_num_threads()
    written, results = [], []

    def emit(res: dict):
        res = {**res, **{k: v for k, v in meta.items() if k not in res}, "loadavg_end": list(os.getloadavg())}
        path = out / f"{res['benchmark']}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(res, indent=1, default=str) + "\n")
        os.replace(tmp, path)
        written.append(path)
        results.append(res)
        print(f"cmbench bench: {res['benchmark']}: {res['measured']} (ratio {_fmt_ratio(res['ratio'])}, "
              f"met {res['met']})", file=sys.stderr, flush=True)

    try:
        if want & {"harness", "sct"}:
            for net in ("mlp", "unet"):
                for res in bench_steps(net, sizes, configs, want & {"harness", "sct"}):
                    emit(res)
                torch.set_num_threads(threads)
        if "fid" in want:
            emit(bench_fid(sizes, configs))
            torch.set_num_threads(threads)
        if "ode" in want:
            emit(bench_ode(sizes, configs))
        if "toy_suite" in want:
            emit(bench_toy_suite(sizes, repo, keep=out))
        if "gpu" in want:
            emit(bench_gpu(sizes, configs))
    finally:
        torch.set_num_threads(threads)
    order = ["harness_step_mlp", "harness_step_unet", "sct_vs_ict_unet", "sct_vs_ict_mlp", "fid_torch_fidelity",
             "ode_ground_truth", "toy_suite", "gpu_ddpmpp"]
    results.sort(key=lambda r: order.index(r["benchmark"]))
    md = table(results, meta)
    (out / "table.md").write_text(md + "\n")
    print(md)
    return written
