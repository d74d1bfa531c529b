"""Toy-suite evaluation: one JSON record per (run, NFE, metric), measured against exact ground truth.

numpy only: never imports torch, train or losses. The ground truth that does not depend on the run (exact
endpoints Φ(x_T) of the fixed sampling noise, fresh true data, each metric's value for true data) is computed
once per (dataset, sampler start) and cached under results/reference/ (DESIGN.md, cost notes)."""
import json
import os
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from cmbench import paths
from cmbench.config import RunConfig, config_hash, load_run_config
from cmbench.data.toy import Gaussian, GaussianMixture, make_toy
from cmbench.metrics import toy
from cmbench.seeds import initial_noise, sample_seeds

# Metric keys (module constants, as torch-fidelity). The step count is never part of a key: it is a field.
W2 = "w2"                        # Gaussian data: W2 of N(sample mean, sample cov) to the exact law
FD = "fd"                        # squared Fréchet distance in data space to fresh true data
SLICED_W2 = "sliced_w2"          # mixtures: sliced W2 to fresh true data
NEAR_MODE = "near_mode_fraction" # mixtures: share of samples within the 98.9% radius of a mode
MODE_COVERAGE_MIN = "mode_coverage_min"  # mixtures: worst mode's near-mode share relative to its weight
ODE_ERROR = "ode_error"          # mean ||sample − Φ(x_T)||², Φ = exact PF-ODE map from the initial noise
BACKEND = "cmbench-toy"


def reference_key(cfg: RunConfig, nfe: int) -> str:
    """Everything the cached ground truth depends on, hashed."""
    return config_hash({"dataset": cfg.dataset.model_dump(mode="json"), "sigma_min": cfg.precond.sigma_min,
                        "sigma_start": cfg.sigma_list(nfe)[0], "seed_start": cfg.sample.seed_start,
                        "n": cfg.sample.n, "evaluate": cfg.evaluate.model_dump(mode="json")})


def reference_path(cfg: RunConfig, nfe: int, results: str | Path) -> Path:
    return paths.reference_file(results, cfg.run.dataset, reference_key(cfg, nfe))


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


def build_reference(cfg: RunConfig, nfe: int, out: Path) -> Path:
    dist = make_toy(cfg.dataset.model_dump())
    x_t = initial_noise(cfg, nfe)
    exact = dist.consistency_map(x_t.astype(np.float64), cfg.sigma_list(nfe)[0], cfg.precond.sigma_min)
    fresh = dist.sample(cfg.evaluate.ref_n, np.random.default_rng([cfg.sample.seed_start, 1]))
    # "ideal": what a perfect sampler scores at this n, averaged over independent draws of n true samples
    draws = [distribution_metrics(dist.sample(cfg.sample.n, np.random.default_rng([r, 2])), dist, fresh, cfg)
             for r in range(cfg.evaluate.floor_repeats)]
    ideal = {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, x_t=x_t, exact=exact, fresh=fresh, ideal=json.dumps(ideal), key=reference_key(cfg, nfe))
    os.replace(tmp, out)
    return out


def collect_records(rdir: Path) -> Path:
    """One file with the records of every NFE of a run (written atomically)."""
    cfg = load_run_config(rdir)
    records = [r for n in cfg.sample.nfe for r in json.loads(paths.metrics_file(rdir, n).read_text())]
    out = paths.records_file(rdir)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, out)
    return out


def evaluate_run(rdir: Path, nfe: int, results: str | Path) -> Path:
    """Metric records for the samples of one run at one NFE; builds the reference if it is not cached."""
    t0 = time.perf_counter()
    rdir = Path(rdir)
    cfg = load_run_config(rdir)
    ref_file = reference_path(cfg, nfe, results)
    if not ref_file.exists():
        build_reference(cfg, nfe, ref_file)
    ref, smp = np.load(ref_file), np.load(paths.samples_file(rdir, nfe))
    meta = json.loads(str(smp["meta"]))
    if not (np.array_equal(smp["seeds"], sample_seeds(cfg)) and np.array_equal(smp["x_t"], ref["x_t"])):
        raise ValueError(f"{paths.samples_file(rdir, nfe)}: seeds or initial noise differ from the reference "
                         f"{ref_file}; re-sample the run")
    dist, x = make_toy(cfg.dataset.model_dump()), smp["samples"].astype(np.float64)
    values = distribution_metrics(x, dist, ref["fresh"], cfg)
    values[ODE_ERROR] = toy.ode_error(x, ref["exact"])
    ideal = json.loads(str(ref["ideal"]))
    if nfe == 1 or meta["sampler"] == "heun":
        ideal[ODE_ERROR] = 0.0   # a perfect 1-step model, or an exact ODE solver, returns Φ(x_T) itself
    wall = time.perf_counter() - t0
    base = {**cfg.run.model_dump(), "config_hash": cfg.hash, "checkpoint_sha256": meta["checkpoint_sha256"],
            "weights": meta["weights"], "nfe": nfe, "sigmas": meta["sigmas"], "sigma_min": meta["sigma_min"],
            "sampler": meta["sampler"], "renoise": meta["renoise"], "sample_seed_start": int(smp["seeds"][0]), "n_gen": int(len(x)),
            "n_ref": int(len(ref["fresh"])), "backend": BACKEND, "backend_version": version("cmbench"),
            "mode": "exact ground truth", "feature_extractor": "none (data space)",
            "reference": str(ref["key"]), "wall_time_s": round(wall, 3)}
    records = [{**base, "metric": name, "value": float(v), "ideal": ideal.get(name)}
               for name, v in sorted(values.items())]
    out = paths.metrics_file(rdir, nfe)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    os.replace(tmp, out)
    return out
