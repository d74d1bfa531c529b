"""fid_torch_fidelity: FID through cmbench (evaluate_run) vs a direct torch_fidelity.calculate_metrics call on
the same generated and reference images, cold (nothing cached) and warm (reference statistics cached)."""
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.common import TARGETS, interleave, median, resolve


@contextmanager
def _random_inception(folder: Path):
    """Point cmbench at a He-initialised InceptionV3 written under `folder` (its weights env var and the opt-in to
    unverified weights, restored on exit); yields the weights file."""
    from cmbench.metrics import fid
    weights = fid.write_random_inception(folder / fid.TF_WEIGHTS)
    old_env = {k: os.environ.get(k) for k in (fid.WEIGHTS_ENV, fid.UNVERIFIED_ENV)}
    os.environ.update({fid.WEIGHTS_ENV: str(weights.parent), fid.UNVERIFIED_ENV: "1"})  # random weights: opt in
    try:
        yield weights
    finally:
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sampled_run(n: int, configs, results: Path):
    """A 2-step iCT run on n patches under `results`, sampled at 1 step: its config, run dir and samples file."""
    import torch

    from cmbench import paths
    from cmbench.sample import sample_run
    from cmbench.train import loop
    cfg = resolve(configs, "bench", "patches", "ict", {
        "train": {"steps": 2}, "dataset": {"size": n}, "sample": {"n": n, "batch": n},
        "evaluate": {"pixel_fd": False, "fid": ["torch-fidelity"]}})
    rdir = paths.run_dir(results, cfg.run)
    loop.train(cfg, rdir, progress=False)
    torch.set_num_threads(os.cpu_count() or 1)   # the training loop set its own thread count
    return cfg, rdir, sample_run(rdir, 1)


def _time_fid(sizes: dict, configs, tmp: Path, weights: Path) -> tuple[dict, int]:
    """Time both FID paths on one sampled run, interleaved: {job: [{s, value}]}, and the batch size."""
    import torch_fidelity

    from cmbench import io as cmbench_io
    from cmbench.data import make_data
    from cmbench.metrics import fid
    from cmbench.metrics.evaluate import evaluate_run
    results = tmp / "results"
    cfg, rdir, samples = _sampled_run(sizes["fid_n"], configs, results)
    batch = cfg.evaluate.batch

    def fresh_process():
        """What a new evaluation job starts without: cmbench's in-process caches of the network and of the
        weights file's sha256."""
        fid._tf_extractor.cache_clear()
        cmbench_io._sha256.cache_clear()

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
                input1=fid.uint8_dataset(gen), input2=fid.uint8_dataset(ref), fid=True, batch_size=batch,
                feature_extractor_weights_path=str(weights), save_cpu_ram=True, cuda=False,
                verbose=False, **kw)
            return {"s": time.perf_counter() - t0, "value": float(m["frechet_inception_distance"])}
        return fn

    direct(True)()    # fills torch-fidelity's own cache of the reference statistics (untimed)
    cmbench_eval(True)()   # warm-up of both paths (untimed)
    return interleave(sizes["repeats"], [("cmbench_cold", cmbench_eval(True)), ("direct_cold", direct(False)),
                                         ("cmbench_warm", cmbench_eval(False)), ("direct_warm", direct(True))]), batch


def bench_fid(sizes: dict, configs) -> dict:
    import torch
    with tempfile.TemporaryDirectory(prefix="cmbench-bench-fid-") as tmp, \
            _random_inception(Path(tmp) / "weights") as weights:
        runs, batch = _time_fid(sizes, configs, Path(tmp), weights)
    return fid_record(runs, sizes["fid_n"], torch.get_num_threads(), batch)


def fid_record(runs: dict, n: int, threads: int, batch: int) -> dict:
    t = {key: [r["s"] for r in v] for key, v in runs.items()}
    med = {key: median(v) for key, v in t.items()}
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
        "torch_threads": threads, "batch_size": batch,
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
