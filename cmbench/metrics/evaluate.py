"""Evaluation: one JSON record per (run, NFE, metric), with everything needed to reproduce the number.

Toy data (numpy only, no torch): metrics against exact ground truth. The ground truth that does not depend on
the run (exact endpoints Φ(x_T) of the fixed sampling noise, fresh true data, each metric's value for true
data) is computed once per (dataset, sampler start) and cached under results/reference/ (DESIGN.md, cost
notes). Images: pixel-space Fréchet distance against cached statistics of the training images, FID through each
configured library (cmbench.metrics.fid), all reading the same sample file, and the 1-step ODE error of a run with
a trained teacher against the teacher's own PF-ODE solution of the same noise (cmbench.metrics.ode_ref)."""
import json
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

from cmbench import io, paths
from cmbench.config import ImageData, RunConfig, config_hash, load_run_config
from cmbench.data.toy import Gaussian, GaussianMixture, make_toy
from cmbench.errors import DamagedFile
from cmbench.metrics import ode_ref, toy
from cmbench.metrics.files import RESAMPLE, json_field, read_npz, read_records, set_aside, write_records
from cmbench.metrics.keys import FD, FID, MODE_COVERAGE_MIN, NEAR_MODE, ODE_ERROR, SLICED_W2, W2
from cmbench.seeds import initial_noise, sample_seeds, seed_labels

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
    if metric_set == ode_ref.REFERENCE:
        return ode_ref.key(cfg)
    if metric_set != "data":
        from cmbench.metrics import fid
        return fid.reference_key(cfg.dataset.model_dump(mode="json"), metric_set, cfg.evaluate.cleanfid_network,
                                 cfg.evaluate.fid_dims)
    if is_image(cfg):
        return config_hash({"dataset": cfg.dataset.model_dump(mode="json"), "n": cfg.sample.n,
                            "floor_repeats": cfg.evaluate.floor_repeats})
    return config_hash({"dataset": cfg.dataset.model_dump(mode="json"), "sigma_min": cfg.precond.sigma_min,
                        "sigma_start": cfg.sigma_list(nfe)[0], "seed_start": cfg.sample.seed_start,
                        "n": cfg.sample.n, "evaluate": cfg.evaluate.model_dump(mode="json", exclude={"every"})})


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


def reference_sets(cfg: RunConfig, nfe: int, metric_set: str) -> list[str]:
    """The cached references an evaluation of one metric set reads: its own, and for "data" records that include
    the teacher's ODE error (ode_ref.applies) the teacher's PF-ODE solution."""
    return [metric_set] + ([ode_ref.REFERENCE] if metric_set == "data" and ode_ref.applies(cfg, nfe) else [])


def build_reference(cfg: RunConfig, nfe: int, out: Path, metric_set: str = "data") -> Path:
    if metric_set == ode_ref.REFERENCE:
        return ode_ref.build(cfg, out)
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
               for r in read_records(paths.metrics_file(rdir, n, m))]
    return write_records(paths.records_file(rdir), records)


# what each kind of cached reference must hold
REFERENCE_KEYS = {"toy": ("x_t", "exact", "fresh", "ideal", "key"), "image": ("mean", "cov", "n", "ideal", "key"),
                  "fid": ("mu", "sigma", "n", "key", "fields"), ode_ref.REFERENCE: ode_ref.KEYS}


def load_reference(cfg: RunConfig, nfe: int, ref_file: Path, metric_set: str) -> dict:
    """The cached reference, built on a miss; a cached file that is unreadable, holds non-finite values or was
    made for another key is set aside (one line on stderr) and rebuilt, instead of failing every evaluation."""
    ode = metric_set == ode_ref.REFERENCE
    keys = REFERENCE_KEYS[metric_set if ode else "fid" if metric_set != "data" else "image" if is_image(cfg) else "toy"]
    # the teacher's ODE solution also names the teacher weights it was solved with
    want = ode_ref.made_for(cfg, ref_file.parent.parent) if ode else reference_key(cfg, nfe, metric_set)
    if ref_file.exists():
        try:
            ref = read_npz(ref_file, keys, fix="delete it (it is rebuilt)")
            if str(ref["key"]) == want:
                return ref
            set_aside(ref_file, f"made for key {str(ref['key'])[:16]}, not this one")
        except DamagedFile as e:
            set_aside(ref_file, str(e).split(": ", 1)[1])
    build_reference(cfg, nfe, ref_file, metric_set)
    return read_npz(ref_file, keys)


META_KEYS = {"nfe", "sigmas", "sigma_min", "sampler", "renoise", "weights", "checkpoint_sha256", "sample_hash"}


def check_samples(path: Path, smp: dict, cfg: RunConfig, nfe: int, rdir: Path, step: int | None = None,
                  x_t: np.ndarray | None = None) -> dict:
    """The sample file's `meta`, once the file is shown to be this run's samples at this NFE: its NFE, σ list,
    sampler, seeds, labels and array shapes match the run config and its checkpoint hash matches the run's
    final.pt (or the EMA snapshot of `step`). Anything else is DamagedFile naming the file and the fix (read_npz
    already refused NaN and inf). `x_t`: the run's initial noise, when the caller has it already."""
    def bad(what):
        raise DamagedFile(f"{path}: {what}; {RESAMPLE}")
    meta = json_field(path, smp, "meta")
    if not isinstance(meta, dict) or not META_KEYS <= meta.keys():
        bad(f"damaged, its meta lacks one of {', '.join(sorted(META_KEYS))}")
    if meta["nfe"] != nfe:
        bad(f"made at NFE {meta['nfe']}, not {nfe}")
    if meta["sample_hash"] != cfg.sample_hash(nfe):
        bad(f"made with sampling settings {meta['sample_hash']}, not the run's {cfg.sample_hash(nfe)}")
    sigmas = cfg.sigma_list(nfe)
    if meta["sigmas"] != sigmas or smp["sigmas"].tolist() != sigmas:
        bad(f"its σ list is not the run's {sigmas}")
    if meta["sampler"] != cfg.sample.sampler:
        bad(f"made with the {meta['sampler']} sampler, not {cfg.sample.sampler}")
    seeds, n = sample_seeds(cfg), cfg.sample.n
    if smp["seeds"].shape != seeds.shape or not np.array_equal(smp["seeds"], seeds):
        bad("its seeds differ from the run's sample.seed_start / sample.n")
    if cfg.dataset.conditional and ("labels" not in smp or not np.array_equal(
            smp["labels"], seed_labels(seeds, cfg.dataset.num_classes))):
        bad("its class labels are not the run's")
    shape = cfg.dataset.shape
    if is_image(cfg):
        want = {"images": ((n, *shape[1:], shape[0]), np.uint8)}
    else:
        want = {"samples": ((n, *shape), None), "x_t": ((n, *shape), None)}
    for k, (shp, dtype) in want.items():
        if k not in smp or smp[k].shape != shp or (dtype and smp[k].dtype != dtype):
            got = f"{smp[k].shape} {smp[k].dtype}" if k in smp else "nothing"
            bad(f"its {k} are {got}, not {shp}{f' {np.dtype(dtype)}' if dtype else ''}")
    if not is_image(cfg) and not np.array_equal(smp["x_t"], initial_noise(cfg, nfe) if x_t is None else x_t):
        bad("its initial noise x_t is not the run's")
    final = paths.weights_file(rdir, step)
    if not final.is_file():
        raise DamagedFile(f"{path}: the run has no {final.name} to check it against; re-run snakemake")
    if meta["checkpoint_sha256"] != io.file_sha256(final)[:16]:   # the prefix cmbench.sample writes
        bad(f"made from checkpoint {str(meta['checkpoint_sha256'])[:16]}, not the run's {final.name}")
    return meta


def _toy_values(cfg: RunConfig, nfe: int, smp, ref, ref_file: Path) -> tuple[dict, dict, dict]:
    if not np.array_equal(smp["x_t"], ref["x_t"]):
        raise DamagedFile(f"{ref_file}: its initial noise differs from the run's samples; delete it (it is rebuilt)")
    dist, x = make_toy(cfg.dataset.model_dump()), smp["samples"].astype(np.float64)
    values = distribution_metrics(x, dist, ref["fresh"], cfg)
    values[ODE_ERROR] = toy.ode_error(x, ref["exact"])
    ideal = json.loads(str(ref["ideal"]))
    if cfg.deterministic(nfe):
        ideal[ODE_ERROR] = 0.0   # a perfect 1-step model, exact ODE solver or flow map returns Φ(x_T) itself
    fields = {"n_ref": int(len(ref["fresh"])), "backend": BACKEND["toy"], "mode": "exact ground truth",
              "feature_extractor": "none (data space)"}
    return values, ideal, fields


def _pixel_values(cfg: RunConfig, smp, ref) -> tuple[dict, dict, dict]:
    values = {FD: toy.frechet_to_stats(pixels(smp["images"]), ref["mean"], ref["cov"])}
    fields = {"n_ref": int(ref["n"]), "backend": BACKEND["image"], "mode": "training-set statistics",
              "feature_extractor": "none (pixel space, [-1, 1])"}
    return values, json.loads(str(ref["ideal"])), fields


def _ode_record(cfg: RunConfig, nfe: int, smp, results: str | Path) -> dict:
    """The ODE error of one-step image samples against the teacher's PF-ODE solution of the same noise
    (metrics.ode_ref), over its first evaluate.ode_n samples, and the fields that say how it was measured (they
    replace the sample file's: n_gen, the reference)."""
    ref = load_reference(cfg, nfe, reference_path(cfg, nfe, results, ode_ref.REFERENCE), ode_ref.REFERENCE)
    n = len(ref["seeds"])
    return {"metric": ODE_ERROR, "value": ode_ref.error(smp["images"][:n], ref["images"]), "ideal": 0.0,
            "n_gen": n, "n_ref": n, "mode": "teacher's PF-ODE solution (Heun)", "reference_split": None,
            "reference": reference_key(cfg, nfe, ode_ref.REFERENCE), "ode_ref_steps": int(ref["steps"]),
            "ode_ref_convergence": float(ref["convergence"]), "ode_ref_convergence_n": int(ref["check_n"]),
            "ode_ref_convergence_steps": int(ref["check_steps"])}


def evaluate_run(rdir: Path, nfe: int, results: str | Path, metric_set: str = "data") -> Path:
    """Metric records for the samples of one run at one NFE and one metric set (RunConfig.metric_sets): the
    final weights' and each EMA snapshot's (evaluate.every), with the same metrics; builds the reference if it
    is not cached."""
    rdir = Path(rdir)
    cfg = load_run_config(rdir)
    if metric_set not in cfg.metric_sets():
        raise ValueError(f"{rdir}: metric set {metric_set!r} is not one of {cfg.metric_sets()}")
    ref_file = reference_path(cfg, nfe, results, metric_set)
    ref = load_reference(cfg, nfe, ref_file, metric_set)
    x_t = None if is_image(cfg) else initial_noise(cfg, nfe)     # the same for every step's samples
    records = [r for step in [*cfg.evaluated_steps(), None]
               for r in _evaluate_samples(cfg, rdir, nfe, step, metric_set, ref, ref_file, x_t, results)]
    return write_records(paths.metrics_file(rdir, nfe, metric_set), records)


def _evaluate_samples(cfg: RunConfig, rdir: Path, nfe: int, step: int | None, metric_set: str, ref,
                      ref_file: Path, x_t: np.ndarray | None, results: str | Path) -> list[dict]:
    """The records of one samples file: the final weights' (step None) or the EMA snapshot's of `step`."""
    t0 = time.perf_counter()
    samples = paths.samples_file(rdir, nfe, step)
    smp = read_npz(samples, ("seeds", "sigmas", "meta"))
    meta = check_samples(samples, smp, cfg, nfe, rdir, step, x_t)
    if metric_set != "data":
        from cmbench.metrics import fid
        r = fid.fid_npz(samples, ref_file, metric_set, device=_device(), network=cfg.evaluate.cleanfid_network,
                        dims=cfg.evaluate.fid_dims,
                        batch_size=cfg.evaluate.batch)
        values, ideal = {FID: r.pop("value")}, {}
        fields = {k: r[k] for k in ("backend", "backend_version", "mode", "feature_extractor", "fid_dims", "n_ref",
                                    "weights_verified")}
    else:
        values, ideal, fields = (_pixel_values(cfg, smp, ref) if is_image(cfg)
                                 else _toy_values(cfg, nfe, smp, ref, ref_file))
        fields["backend_version"] = version("cmbench")
    done = meta.get("step", cfg.train.steps)     # samples of older versions: the final weights, cost unknown
    base = {**cfg.run.model_dump(), "config_hash": cfg.hash, "sample_hash": meta["sample_hash"],
            "step": done, "images": done * cfg.train.batch, "train_seconds": meta.get("train_seconds"),
            "train_flops": meta.get("train_flops"),
            "checkpoint_sha256": meta["checkpoint_sha256"],
            "weights": meta["weights"], "nfe": nfe, "sigmas": meta["sigmas"], "sigma_min": meta["sigma_min"],
            "sampler": meta["sampler"], "renoise": meta["renoise"], "clip_denoised": meta.get("clip_denoised"),
            "sample_seed_start": int(smp["seeds"][0]),
            "n_gen": int(len(smp["seeds"])), **fields, "reference": reference_key(cfg, nfe, metric_set),
            **({"reference_split": "train", "conditional": cfg.dataset.conditional} if is_image(cfg) else {}),
            "wall_time_s": round(time.perf_counter() - t0, 3)}
    records = [{**base, "metric": name, "value": float(v), "ideal": ideal.get(name)}
               for name, v in sorted(values.items())]
    if metric_set == "data" and ode_ref.applies(cfg, nfe):
        records.append({**base, **_ode_record(cfg, nfe, smp, results)})
    return records
