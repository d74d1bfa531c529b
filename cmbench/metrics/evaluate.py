"""Evaluation: one JSON record per (run, NFE, metric), with everything needed to reproduce the number.

Toy data (numpy only, no torch): metrics against exact ground truth. The ground truth that does not depend on
the run (exact endpoints Φ(x_T) of the fixed sampling noise, fresh true data, each metric's value for true
data) is computed once per (dataset, sampler start) and cached under results/reference/ (DESIGN.md, cost
notes). Images: pixel-space Fréchet distance against cached statistics of the training images, and FID
through each configured library (cmbench.metrics.fid), all reading the same sample file."""
import json
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from cmbench import io, paths
from cmbench.config import ImageData, RunConfig, config_hash, load_run_config
from cmbench.data.toy import Gaussian, GaussianMixture, make_toy
from cmbench.metrics import toy
from cmbench.metrics.keys import FD, FID, MODE_COVERAGE_MIN, NEAR_MODE, ODE_ERROR, SLICED_W2, W2
from cmbench.seeds import initial_noise, sample_seeds

BACKEND = {"toy": "cmbench-toy", "image": "cmbench-pixels"}


def is_image(cfg: RunConfig) -> bool:
    return isinstance(cfg.dataset, ImageData)


def _device() -> str:
    """Feature extraction runs on the GPU when the evaluation job has one."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def pixels(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC → float64 vectors in [−1, 1], the scale the model works at."""
    return images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1


def reference_key(cfg: RunConfig, nfe: int, metric_set: str = "data") -> str:
    """Everything the cached ground truth or reference statistics depend on, hashed."""
    if metric_set != "data":
        from cmbench.metrics import fid
        return fid.reference_key(cfg.dataset.model_dump(mode="json"), metric_set, cfg.evaluate.cleanfid_network,
                                 cfg.evaluate.fid_dims)
    if is_image(cfg):
        return config_hash({"dataset": cfg.dataset.model_dump(mode="json"), "n": cfg.sample.n,
                            "floor_repeats": cfg.evaluate.floor_repeats})
    return config_hash({"dataset": cfg.dataset.model_dump(mode="json"), "sigma_min": cfg.precond.sigma_min,
                        "sigma_start": cfg.sigma_list(nfe)[0], "seed_start": cfg.sample.seed_start,
                        "n": cfg.sample.n, "evaluate": cfg.evaluate.model_dump(mode="json")})


def reference_path(cfg: RunConfig, nfe: int, results: str | Path, metric_set: str = "data") -> Path:
    return paths.reference_file(results, cfg.run.dataset, reference_key(cfg, nfe, metric_set), metric_set)


def distribution_metrics(x: np.ndarray, dist, fresh: np.ndarray, cfg: RunConfig) -> dict[str, float]:
    """Metrics that compare a sample set with the data law (no pairing with the initial noise)."""
    out = {FD: toy.frechet_distance(x, fresh)}
    if isinstance(dist, Gaussian):
        out[W2] = toy.gaussian_w2(x, dist.mean, dist.cov)
    if isinstance(dist, GaussianMixture):
        out[SLICED_W2] = toy.sliced_w2(x, fresh, cfg.evaluate.sliced_projections)
        frac, coverage = toy.near_mode(x, dist.means, dist.stds, dist.weights)
        out[NEAR_MODE], out[MODE_COVERAGE_MIN] = frac, float(coverage.min())
    return out


def build_reference(cfg: RunConfig, nfe: int, out: Path, metric_set: str = "data") -> Path:
    if metric_set != "data":
        from cmbench.data import make_data
        from cmbench.metrics import fid
        return fid.build_reference(lambda: make_data(cfg.dataset).images_uint8(), metric_set,
                                   reference_key(cfg, nfe, metric_set), out, device=_device(),
                                   network=cfg.evaluate.cleanfid_network, batch_size=cfg.evaluate.batch,
                                   dims=cfg.evaluate.fid_dims)
    if is_image(cfg):
        return build_image_reference(cfg, out)
    dist = make_toy(cfg.dataset.model_dump())
    x_t = initial_noise(cfg, nfe)
    exact = dist.consistency_map(x_t.astype(np.float64), cfg.sigma_list(nfe)[0], cfg.precond.sigma_min)
    fresh = dist.sample(cfg.evaluate.ref_n, np.random.default_rng([cfg.sample.seed_start, 1]))
    # "ideal": what a perfect sampler scores at this n, averaged over independent draws of n true samples
    draws = [distribution_metrics(dist.sample(cfg.sample.n, np.random.default_rng([r, 2])), dist, fresh, cfg)
             for r in range(cfg.evaluate.floor_repeats)]
    ideal = {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}
    return io.save_npz(out, x_t=x_t, exact=exact, fresh=fresh, ideal=json.dumps(ideal), key=reference_key(cfg, nfe))


def build_image_reference(cfg: RunConfig, out: Path) -> Path:
    """Pixel statistics of the training images, and the FD that n images drawn from them score (the floor)."""
    from cmbench.data import make_data
    x = pixels(make_data(cfg.dataset).images_uint8())
    mean, cov = toy.gaussian_fit(x)
    floor = [toy.frechet_to_stats(x[np.random.default_rng([r, 2]).integers(0, len(x), cfg.sample.n)], mean, cov)
             for r in range(cfg.evaluate.floor_repeats)]
    return io.save_npz(out, mean=mean, cov=cov, n=len(x), ideal=json.dumps({FD: float(np.mean(floor))}),
                     key=reference_key(cfg, 0))


def collect_records(rdir: Path) -> Path:
    """One file with the records of every NFE and metric set of a run (written atomically)."""
    cfg = load_run_config(rdir)
    records = [r for n in cfg.sample.nfe for m in cfg.metric_sets()
               for r in json.loads(paths.metrics_file(rdir, n, m).read_text())]
    return io.write_json(paths.records_file(rdir), records)


def _toy_values(cfg: RunConfig, nfe: int, smp, ref, ref_file: Path) -> tuple[dict, dict, dict]:
    if not np.array_equal(smp["x_t"], ref["x_t"]):
        raise ValueError(f"initial noise differs from the reference {ref_file}; re-sample the run")
    dist, x = make_toy(cfg.dataset.model_dump()), smp["samples"].astype(np.float64)
    values = distribution_metrics(x, dist, ref["fresh"], cfg)
    values[ODE_ERROR] = toy.ode_error(x, ref["exact"])
    ideal = json.loads(str(ref["ideal"]))
    if nfe == 1 or json.loads(str(smp["meta"]))["sampler"] == "heun":
        ideal[ODE_ERROR] = 0.0   # a perfect 1-step model, or an exact ODE solver, returns Φ(x_T) itself
    fields = {"n_ref": int(len(ref["fresh"])), "backend": BACKEND["toy"], "mode": "exact ground truth",
              "feature_extractor": "none (data space)"}
    return values, ideal, fields


def _pixel_values(cfg: RunConfig, smp, ref) -> tuple[dict, dict, dict]:
    values = {FD: toy.frechet_to_stats(pixels(smp["images"]), ref["mean"], ref["cov"])}
    fields = {"n_ref": int(ref["n"]), "backend": BACKEND["image"], "mode": "training-set statistics",
              "feature_extractor": "none (pixel space, [-1, 1])"}
    return values, json.loads(str(ref["ideal"])), fields


def evaluate_run(rdir: Path, nfe: int, results: str | Path, metric_set: str = "data") -> Path:
    """Metric records for the samples of one run at one NFE and one metric set (RunConfig.metric_sets);
    builds the reference if it is not cached."""
    t0 = time.perf_counter()
    rdir = Path(rdir)
    cfg = load_run_config(rdir)
    if metric_set not in cfg.metric_sets():
        raise ValueError(f"{rdir}: metric set {metric_set!r} is not one of {cfg.metric_sets()}")
    samples = paths.samples_file(rdir, nfe)
    ref_file = reference_path(cfg, nfe, results, metric_set)
    if not ref_file.exists():
        build_reference(cfg, nfe, ref_file, metric_set)
    smp = np.load(samples)
    meta = json.loads(str(smp["meta"]))
    if meta.get("sample_hash") != cfg.sample_hash(nfe):
        raise ValueError(f"{samples}: made with sampling settings {meta.get('sample_hash')}, not the run's "
                         f"{cfg.sample_hash(nfe)} (its config.json); re-sample it")
    if not np.array_equal(smp["seeds"], sample_seeds(cfg)):
        raise ValueError(f"{samples}: its seeds differ from the run's sample.seed_start / sample.n; re-sample it")
    if metric_set != "data":
        from cmbench.metrics import fid
        r = fid.fid_npz(samples, ref_file, metric_set, device=_device(), network=cfg.evaluate.cleanfid_network,
                        dims=cfg.evaluate.fid_dims,
                        batch_size=cfg.evaluate.batch)
        values, ideal = {FID: r.pop("value")}, {}
        fields = {k: r[k] for k in ("backend", "backend_version", "mode", "feature_extractor", "fid_dims", "n_ref")}
    else:
        ref = np.load(ref_file)
        values, ideal, fields = (_pixel_values(cfg, smp, ref) if is_image(cfg)
                                 else _toy_values(cfg, nfe, smp, ref, ref_file))
        fields["backend_version"] = version("cmbench")
    base = {**cfg.run.model_dump(), "config_hash": cfg.hash, "sample_hash": meta["sample_hash"],
            "checkpoint_sha256": meta["checkpoint_sha256"],
            "weights": meta["weights"], "nfe": nfe, "sigmas": meta["sigmas"], "sigma_min": meta["sigma_min"],
            "sampler": meta["sampler"], "renoise": meta["renoise"], "clip_denoised": meta.get("clip_denoised"),
            "sample_seed_start": int(smp["seeds"][0]),
            "n_gen": int(len(smp["seeds"])), **fields, "reference": reference_key(cfg, nfe, metric_set),
            **({"reference_split": "train", "conditional": cfg.dataset.conditional} if is_image(cfg) else {}),
            "wall_time_s": round(time.perf_counter() - t0, 3)}
    records = [{**base, "metric": name, "value": float(v), "ideal": ideal.get(name)}
               for name, v in sorted(values.items())]
    return io.write_json(paths.metrics_file(rdir, nfe, metric_set), records)
