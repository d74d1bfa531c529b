"""The GPU check (issue #16): `python -m benchmarks.gpu [--quick] [--out DIR] [--peak-tflops X]`, or
`bash benchmarks/gpu_run.sh` on a bare GPU machine (it installs the carried wheels first). One JSON per figure:
  gpu_train   training img/s, peak memory and model FLOPs utilisation per variant on DDPM++ (55.7M), batch 128,
              fp32/bf16 × compile off/on; ECT and sCT also at batch 512; a profiler table where a target is missed
  gpu_sample  1- and 2-step sampling img/s
  gpu_fid     FID of 10k samples through torch-fidelity and clean-fid, seconds per 10k
  gpu_smoke   ECT on CIFAR-shaped photo patches: the loss falls, then sample → FID (the whole GPU path)
Each section has a time budget (8 minutes in all on one H200); what does not fit is recorded as skipped. --quick:
a tiny U-Net and tiny sizes, end to end on a CPU (the plumbing, not the speed). Needs neither Snakemake nor Slurm."""
import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, git_state, machine, resolve, write_record

# derived images/s per GPU of published training runs (issue #16): ratios are reported, never asserted
ANCHORS = {
    "edm_ddpmpp_v100": {"img_per_s": 145.0, "gpu": "V100",
                        "derived": "EDM CIFAR-10 DDPM++: 200 Mimg in about 2 days on 8 V100"},
    "ect_a100": {"img_per_s": 285.0, "gpu": "A100",
                 "derived": "ECT CIFAR-10 2-step FID 2.73: 8k iterations at batch 128 in one A100-hour"},
    "meanflow_h200": {"img_per_s": 610.0, "gpu": "H200", "derived": "the PyTorch MeanFlow port at batch 1024"},
}
ANCHOR_NOTE = ("anchors measured on other GPUs (V100, A100) are not comparable one to one with this GPU; the "
               "ratio is reported, not asserted")
PEAK_BF16 = {"H200": 790e12}    # measured dense bf16 matrix rate (issue #16); other GPUs: --peak-tflops
TARGETS = {"ect_ict_bf16_img_per_s": 570.0, "mfu": 0.25, "sct_over_ict_step": 2.0, "fid_50k_s": 120.0}
# timed in this order (the targets' first); the distillation variants add a teacher DDPM++: not timed here
VARIANTS = ("ect", "ict", "sct", "edm", "ct")
DDPMPP = {"model_channels": 128, "channel_mult": [2, 2, 2], "num_blocks": 4, "attn_resolutions": [16]}
SIZES = {
    "full": {"net": DDPMPP, "batch": 128, "big_batch": 512, "steps": (5, 20), "sample_batch": 1024,
             "sample_reps": 10, "fid_n": 10_000, "fid_dims": 2048, "fid_batch": 500, "smoke_steps": 300,
             "smoke_batch": 128, "smoke_n": 2000, "data_n": 2000, "profile_steps": 3, "compile_variants": VARIANTS,
             "budget_s": {"train": 270, "sample": 20, "fid": 100, "smoke": 90}},
    "quick": {"net": {"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": [16]},
              "batch": 4, "big_batch": 8, "steps": (1, 1), "sample_batch": 8, "sample_reps": 2, "fid_n": 16,
              "fid_dims": 64, "fid_batch": 16, "smoke_steps": 24, "smoke_batch": 16, "smoke_n": 16, "data_n": 64,
              "profile_steps": 1, "compile_variants": ("sct",),   # sCT: the JVP through a compiled net
              "budget_s": {"train": 120, "sample": 30, "fid": 60, "smoke": 60}},
}


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _config(configs, variant: str, size: dict, train: dict, **more):
    """A variant's checked config on CIFAR-shaped photo patches with the benchmark's net; ECT and sCT from scratch
    (on images their configs start from a trained EDM run)."""
    over = {"net": size["net"], "dataset": {"size": size["data_n"]}, "train": train, **more}
    if variant in ("ect", "sct"):
        over["teacher"] = None
    return resolve(configs, "bench", "patches", variant, over)


def _profile(tr, parts, warm: int, steps: int) -> str:
    """torch profiler's top kernels (by device time on a GPU, CPU time otherwise) over `steps` training steps
    after `warm` unprofiled ones (compilation)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    for k in range(warm):
        tr.step(k, parts, 1)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for k in range(steps):
            tr.step(warm + k, parts, 1)
        _sync()
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def _trainer(configs, size, variant, batch, precision, compiled):
    from cmbench import devices
    from cmbench.train.loop import Trainer
    cfg = _config(configs, variant, size, {"batch": batch, "precision": precision, "compile": compiled})
    with tempfile.TemporaryDirectory(prefix="cmbench-gpu-") as tmp:
        return Trainer.build(cfg, Path(tmp), devices.device())


def _train_row(configs, size, variant, batch, precision, compiled, flops_cache, peak) -> dict:
    """One training configuration timed through the training loop's own Trainer.step (autocast, loss scale,
    host reads of the loss and gradient norm included), after warm-up steps (compilation happens there)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    tr = _trainer(configs, size, variant, batch, precision, compiled)
    parts, (warm, steps) = [slice(0, batch)], size["steps"]
    if (variant, batch) not in flops_cache:      # counted as run: forward, backward and the JVP (eager)
        with FlopCounterMode(display=False) as counter:
            tr.gradients(0, parts, 1)
        flops_cache[variant, batch] = counter.get_total_flops()
    t0 = time.perf_counter()
    for k in range(warm):
        tr.step(k, parts, 1)
    _sync()
    warm_s = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for k in range(steps):
        tr.step(warm + k, parts, 1)
    _sync()
    dt = time.perf_counter() - t0
    flops = flops_cache[variant, batch]
    row = {"variant": variant, "batch": batch, "precision": precision, "compile": compiled,
           "params": sum(p.numel() for p in tr.model.parameters()),
           "img_per_s": batch * steps / dt, "step_s": dt / steps, "warmup_s": warm_s, "timed_steps": steps,
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
           "flops_per_step": flops, "mfu": None if peak is None else flops * steps / dt / peak,
           "anchor_ratios": {k: batch * steps / dt / a["img_per_s"] for k, a in ANCHORS.items()}}
    return row


def bench_train(configs, size, peak) -> dict:
    budget, t_start = size["budget_s"]["train"], time.perf_counter()
    # bf16 first, the targets' variants first within it: a budget that runs out drops the least wanted rows
    on = size["compile_variants"]
    plan = [(v, size["batch"], p, c) for p in ("bf16", "fp32") for c in (False, True) for v in VARIANTS
            if v in on or not c]
    plan += [(v, size["big_batch"], "bf16", c) for c in (False, True) for v in ("ect", "sct") if v in on or not c]
    rows, flops_cache, profiles = [], {}, {}
    for variant, batch, precision, compiled in plan:
        if time.perf_counter() - t_start > budget:
            rows.append({"variant": variant, "batch": batch, "precision": precision, "compile": compiled,
                         "skipped": f"over the section's budget of {budget} s"})
            continue
        try:
            rows.append(_train_row(configs, size, variant, batch, precision, compiled, flops_cache, peak))
        except Exception as e:    # noqa: BLE001 (a compile failure is a finding: recorded, the rest goes on)
            rows.append({"variant": variant, "batch": batch, "precision": precision, "compile": compiled,
                         "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"})
    best = {}    # (variant, batch, precision) → the faster of compile off/on
    for r in rows:
        if "img_per_s" in r and r["img_per_s"] > best.get((r["variant"], r["batch"], r["precision"]), {}).get(
                "img_per_s", 0):
            best[r["variant"], r["batch"], r["precision"]] = r
    checks = {}
    for v in ("ect", "ict"):
        r = best.get((v, size["batch"], "bf16"))
        if r is None:
            continue
        checks[f"{v}_bf16_img_per_s"] = {"value": r["img_per_s"], "target": TARGETS["ect_ict_bf16_img_per_s"],
                                         "met": r["img_per_s"] >= TARGETS["ect_ict_bf16_img_per_s"]}
        checks[f"{v}_bf16_mfu"] = {"value": r["mfu"], "target": TARGETS["mfu"],
                                   "met": None if r["mfu"] is None else r["mfu"] >= TARGETS["mfu"]}
        if not (checks[f"{v}_bf16_img_per_s"]["met"] and checks[f"{v}_bf16_mfu"]["met"]):
            tr = _trainer(configs, size, v, size["batch"], "bf16", r["compile"])
            profiles[f"{v}_bf16_batch{size['batch']}_compile_{r['compile']}"] = _profile(
                tr, [slice(0, size["batch"])], size["steps"][0], size["profile_steps"])
    sct, ict = best.get(("sct", size["batch"], "bf16")), best.get(("ict", size["batch"], "bf16"))
    if sct and ict:
        ratio = sct["step_s"] / ict["step_s"]
        checks["sct_over_ict_step"] = {"value": ratio, "target": TARGETS["sct_over_ict_step"],
                                       "met": ratio <= TARGETS["sct_over_ict_step"]}
    ect = checks.get("ect_bf16_img_per_s")
    return {"benchmark": "gpu_train", "title": f"DDPM++ training img/s per variant, batch {size['batch']} "
            f"(ECT, sCT also {size['big_batch']}), fp32/bf16, compile off/on", "rows": rows, "checks": checks,
            "profiles": profiles, "anchors": ANCHORS, "anchor_note": ANCHOR_NOTE, "peak_flops": peak,
            "timings": {"section_s": time.perf_counter() - t_start, "budget_s": budget},
            "ratio": None if ect is None else ect["value"] / ANCHORS["ect_a100"]["img_per_s"],
            "target": {"op": ">=", "value": TARGETS["ect_ict_bf16_img_per_s"]},
            "met": None if not checks else all(c["met"] for c in checks.values() if c["met"] is not None),
            "measured": "; ".join(f"{k} {c['value']:.3g}" for k, c in checks.items() if c["value"] is not None),
            "notes": "img/s through cmbench.train.loop.Trainer.step on photo-patch batches; FLOPs "
                     "per step counted with torch.utils.flop_counter on one eager step as run (forward, backward, "
                     "JVP); MFU = FLOPs × steps/s ÷ peak_flops; ratio: ECT bf16 img/s ÷ ECT's A100 anchor."}


def bench_sample(configs, size) -> dict:
    """1- and 2-step consistency sampling (CM Alg. 1: denoise at σ_max; re-noise to σ₂, denoise) of the
    network, fp32 and bf16, no gradients."""
    import torch

    from cmbench import devices
    from cmbench.nets import build_model
    cfg = _config(configs, "ict", size, {})
    dev = devices.device()
    model = build_model(cfg).to(dev).eval()
    b, reps, (s1, s2) = size["sample_batch"], size["sample_reps"], cfg.sigma_list(2)
    g = torch.Generator(dev).manual_seed(0)
    z = torch.randn(b, *cfg.dataset.shape, device=dev, generator=g)
    sig = lambda s: torch.full((b,), s, device=dev)    # noqa: E731

    def sample(nfe):
        x = model(z * s1, sig(s1))
        if nfe == 2:
            x = model(x + z * s2, sig(s2))
        return x

    rows, t_start = [], time.perf_counter()
    for precision in ("fp32", "bf16"):
        ctx = torch.autocast(dev.type, torch.bfloat16, enabled=precision == "bf16")
        for nfe in (1, 2):
            with torch.no_grad(), ctx:
                sample(nfe)
                _sync()
                t0 = time.perf_counter()
                for _ in range(reps):
                    sample(nfe)
                _sync()
            rows.append({"nfe": nfe, "precision": precision, "batch": b,
                         "img_per_s": b * reps / (time.perf_counter() - t0)})
    one = next(r["img_per_s"] for r in rows if r["nfe"] == 1 and r["precision"] == "bf16")
    return {"benchmark": "gpu_sample", "title": f"1- and 2-step sampling img/s, batch {b}", "rows": rows,
            "timings": {"section_s": time.perf_counter() - t_start}, "ratio": None, "target": None, "met": None,
            "measured": ", ".join(f"{r['nfe']}-step {r['precision']} {r['img_per_s']:.0f}" for r in rows),
            "notes": f"bf16 1-step {one:.0f} img/s; no target in issue #16"}


def _fid_weights(tmp: Path):
    """The official Inception weights where cmbench finds them, else a He-initialised one (same cost,
    meaningless values): the context manager, and what it is."""
    import contextlib

    from benchmarks.fid import _random_inception
    from cmbench.errors import MissingWeights
    from cmbench.metrics import fid
    try:
        fid.tf_weights_path()
        return contextlib.nullcontext(), "official torch-fidelity weights"
    except MissingWeights:
        return _random_inception(tmp), "He-initialised InceptionV3 (no weights found): meaningless values"


def fid_of(images, reference, size, dev) -> dict:
    """FID and seconds of `images` against `reference` (uint8 NHWC) through torch-fidelity and clean-fid; where
    clean-fid's own TorchScript weights are absent it runs its preprocessing on torch-fidelity's network."""
    from cmbench.errors import MissingWeights
    from cmbench.metrics import fid
    try:
        fid.cf_weights_path()
        cf_net = "own"
    except MissingWeights:
        cf_net = "torch-fidelity"
    out = {}
    for spec, network in (("torch-fidelity", "own"), ("clean-fid/clean", cf_net)):
        t0 = time.perf_counter()
        kw = {"device": str(dev), "batch_size": size["fid_batch"], "network": network, "dims": size["fid_dims"]}
        a = fid.stats(fid.features(images, spec, **kw), spec)
        b = fid.stats(fid.features(reference, spec, **kw), spec)
        out[spec] = {"fid": fid.frechet(*a, *b, spec), "seconds": time.perf_counter() - t0, "network": network}
    return out


def bench_fid(configs, size, tmp: Path) -> dict:
    import numpy as np

    from cmbench import devices
    from cmbench.data import make_data
    n, dev = size["fid_n"], devices.device()
    ref = make_data(_config(configs, "ict", size, {}, dataset={"size": n}).dataset).images_uint8()[:n]
    gen = np.random.default_rng(0).integers(0, 256, ref.shape, dtype=np.uint8)
    weights, what = _fid_weights(tmp / "weights")
    t_start = time.perf_counter()
    with weights:
        libs = fid_of(gen, ref, size, dev)
    for r in libs.values():
        r["seconds_per_10k"] = r["seconds"] * 10_000 / n
        r["projected_50k_s"] = r["seconds"] * 50_000 / n
        r["met_50k"] = r["projected_50k_s"] <= TARGETS["fid_50k_s"]
    worst = max(r["projected_50k_s"] for r in libs.values())
    return {"benchmark": "gpu_fid", "title": f"FID of {n} uniform-noise images vs {n} photo patches, both "
            "libraries", "libraries": libs, "weights": what, "dims": size["fid_dims"],
            "timings": {"section_s": time.perf_counter() - t_start}, "ratio": worst / TARGETS["fid_50k_s"],
            "target": {"op": "<=", "value": 1.0}, "met": worst <= TARGETS["fid_50k_s"],
            "measured": ", ".join(f"{k} {r['seconds_per_10k']:.1f} s/10k" for k, r in libs.items()),
            "notes": "seconds include features of both sets, statistics and the Fréchet distance; 50k projected "
                     "linearly (target ≤ 120 s per library); ratio: the slower projection ÷ 120 s"}


def bench_smoke(configs, size, tmp: Path, precision: str) -> dict:
    """ECT on photo patches through the whole loop (loss, checkpoints, stats), the EMA sampled at 1 step, FID."""
    import numpy as np

    from cmbench import devices, paths
    from cmbench.data import make_data
    from cmbench.sample import sample_run
    from cmbench.train import loop
    steps, n = size["smoke_steps"], size["smoke_n"]
    # the EMA spans about the last tenth of the run, so that the samples show what training reached
    cfg = _config(configs, "ect", size, {"steps": steps, "batch": size["smoke_batch"], "precision": precision,
                                         "log_every": max(steps // 6, 1), "checkpoint_every": steps,
                                         "ema_decay": 1 - 10 / steps},
                  sample={"n": n, "batch": min(n, 500)}, loss={"double_every": max(steps // 4, 1)},
                  evaluate={"fid": [], "pixel_fd": False})
    t_start = time.perf_counter()
    rdir = paths.run_dir(tmp / "results", cfg.run)
    loop.train(cfg, rdir, progress=False)
    train_s = time.perf_counter() - t_start
    losses = [json.loads(line)["loss"] for line in paths.stats_file(rdir).read_text().splitlines()]
    with np.load(sample_run(rdir, 1)) as z:
        images = z["images"]
    ref = make_data(cfg.dataset).images_uint8()[:n]
    weights, what = _fid_weights(tmp / "smoke-weights")
    with weights:
        libs = fid_of(images, ref, size, devices.device())
    falling = losses[-1] < losses[0]
    return {"benchmark": "gpu_smoke", "title": f"ECT smoke: {steps} steps on photo patches ({precision}), "
            f"1-step sample → FID", "losses": losses, "loss_falling": falling,
            "fid": {k: r["fid"] for k, r in libs.items()}, "weights": what, "samples": n,
            "timings": {"train_s": train_s, "section_s": time.perf_counter() - t_start},
            "ratio": losses[-1] / losses[0], "target": {"op": "<", "value": 1.0}, "met": falling,
            "measured": f"loss {losses[0]:.3g} → {losses[-1]:.3g}, FID " +
                        ", ".join(f"{k} {r['fid']:.4g}" for k, r in libs.items()),
            "notes": "ratio: last logged loss ÷ first; ECT's Δt halves every steps/4 (double_every), which raises "
                     "the loss's scale late in a short run"}


def run(out: Path, quick: bool, configs, peak_tflops: float | None, command: str) -> list[Path]:
    import torch

    from cmbench.train import loop
    size = SIZES["quick" if quick else "full"]
    if quick:      # inductor's C++ builds take minutes on a CPU; tests/test_precision.py runs inductor once
        loop.COMPILE_BACKEND = "aot_eager"
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else None
    peak = peak_tflops * 1e12 if peak_tflops else next((v for k, v in PEAK_BF16.items() if name and k in name), None)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "torch": torch.__version__, "cuda": torch.version.cuda, "gpu": name,
            **git_state(REPO), "command": command, "quick": quick, "repeats": 1,
            "compile_backend": loop.COMPILE_BACKEND}
    written = []

    def section(key, fn):
        t0 = time.perf_counter()
        try:
            rec = fn()
        except Exception as e:   # noqa: BLE001 (one section's failure is recorded; the others still run)
            rec = {"benchmark": key, "title": key, "error": f"{type(e).__name__}: {e}"[:2000], "ratio": None,
                   "target": None, "met": None, "measured": "error", "timings": {}}
        rec = {**rec, **{k: v for k, v in meta.items() if k not in rec}}
        rec["timings"]["wall_s"] = time.perf_counter() - t0
        written.append(write_record(out, rec))
        print(f"benchmarks.gpu: {key}: {rec['measured']} ({rec['timings']['wall_s']:.0f} s)", file=sys.stderr,
              flush=True)

    with tempfile.TemporaryDirectory(prefix="cmbench-gpu-") as tmp:
        tmp = Path(tmp)
        section("gpu_train", lambda: bench_train(configs, size, peak))
        section("gpu_sample", lambda: bench_sample(configs, size))
        section("gpu_fid", lambda: bench_fid(configs, size, tmp))
        section("gpu_smoke", lambda: bench_smoke(configs, size, tmp, "bf16" if cuda else "fp32"))
    return written


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench", help="JSON directory (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, end to end on a CPU in about a minute")
    ap.add_argument("--configs", default=str(REPO / "configs"), help="config directory (default: the repo's)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's dense bf16 TFLOP/s for MFU (default: a lookup by GPU name, H200 790)")
    a = ap.parse_args(argv)
    cmd = "python -m benchmarks.gpu" + (" --quick" if a.quick else "") + f" --out {a.out}"
    for path in run(Path(a.out), a.quick, a.configs, a.peak_tflops, cmd):
        print(path)


if __name__ == "__main__":
    main()
