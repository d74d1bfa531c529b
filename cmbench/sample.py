"""Few-step consistency sampling on an explicit σ list, with per-sample seeds (cmbench.seeds).

Samples go to an npz: toy runs keep float samples and x_T (evaluation pairs them with the exact flow); image
runs keep uint8 NHWC `images` (what FID reads; DESIGN.md property 5). A run's seeds can be split into shards
sampled by several tasks and merged: every sample depends only on its own seed."""
import json
from pathlib import Path

import numpy as np
import torch

from cmbench import paths, solvers
from cmbench.config import ImageData, load_run_config
from cmbench.nets import build_model
from cmbench.seeds import initial_noise, sample_seeds, seed_labels, seed_noise
from cmbench import checkpoint, devices, io
from cmbench.errors import DamagedFile


RENOISE = {"cm": lambda sigma, sigma_min: float(np.sqrt(sigma**2 - sigma_min**2)),   # CM Alg. 1, iCT
           "plain": lambda sigma, sigma_min: float(sigma)}                              # ECT, sCM (papers.md §9.8)


def model_device(model) -> torch.device:
    p = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return p.device if p is not None else torch.device("cpu")


def _batch_labels(labels: np.ndarray | None, lo: int, batch: int, dev) -> torch.Tensor | None:
    return None if labels is None else torch.from_numpy(labels[lo:lo + batch]).to(dev)


NOISE_MEMO_BYTES = 256 * 2**20
_noise_memo: dict = {}


def memo_noise(key: tuple, make) -> np.ndarray:
    """make(), remembered under `key` while the memo stays under NOISE_MEMO_BYTES: the final weights and every
    EMA snapshot of a run sample the same seeds, so they share the per-seed noise (cmbench.seeds), which on toy
    data costs more than the network."""
    if key not in _noise_memo:
        value = make()
        if sum(v.nbytes for v in _noise_memo.values()) + value.nbytes > NOISE_MEMO_BYTES:
            _noise_memo.clear()
        _noise_memo[key] = value
    return _noise_memo[key]


@torch.no_grad()
def consistency_sample(model, sigmas: list[float], seeds: np.ndarray, x_t: np.ndarray, sigma_min: float,
                       batch: int, renoise: str = "cm", clip_denoised: bool = False,
                       labels: np.ndarray | None = None) -> np.ndarray:
    """CM multistep sampler (Song et al. 2023, Alg. 1): x ← f(x_T, σ_0); for σ_k, k ≥ 1:
    x ← f(x + s_k·z_k, σ_k) with s_k from RENOISE. One step when len(sigmas) == 1. clip_denoised clamps each
    denoised image to [−1, 1] before it is re-noised, as the CM code's sampler does (its final clamp is the
    uint8 conversion's)."""
    out, dev = [], model_device(model)
    for lo in range(0, len(seeds), batch):
        s, x = seeds[lo:lo + batch], torch.from_numpy(x_t[lo:lo + batch]).to(dev)
        y = _batch_labels(labels, lo, batch, dev)
        x = model(x, torch.tensor(sigmas[0], device=dev), y)
        for k, sigma in enumerate(sigmas[1:], start=1):
            if clip_denoised:
                x = x.clamp(-1, 1)
            z = memo_noise(("z", s.tobytes(), tuple(x.shape[1:]), k),
                           lambda: seed_noise(s, tuple(x.shape[1:]), k).astype(np.float32))
            z = torch.from_numpy(z).to(dev)
            x = model(x + RENOISE[renoise](sigma, sigma_min) * z, torch.tensor(sigma, device=dev), y)
        out.append(x.cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def ode_sample(model, sigmas: list[float], x_t: np.ndarray, batch: int, labels: np.ndarray | None = None) -> np.ndarray:
    """A denoiser sampled with EDM's deterministic Heun sampler (Alg. 1) over σ list + 0."""
    dev = model_device(model)
    return np.concatenate([solvers.sample_ode(model, torch.from_numpy(x_t[lo:lo + batch]).to(dev), sigmas,
                                              labels=_batch_labels(labels, lo, batch, dev)).cpu().numpy()
                           for lo in range(0, len(x_t), batch)])


@torch.no_grad()
def flowmap_sample(model, sigmas: list[float], x_t: np.ndarray, batch: int,
                   labels: np.ndarray | None = None) -> np.ndarray:
    """The flow-map methods' few-step sampler: x ← Φ_{σ_k→σ_{k+1}}(x) along the σ list and then to 0, with no
    re-noising (MeanFlow's z_r = z_t − (t − r)·u, Shortcut's steps of size d, IMM's pushforward sampler)."""
    out, dev = [], model_device(model)
    ends = [*sigmas, 0.0]
    for lo in range(0, len(x_t), batch):
        x, y = torch.from_numpy(x_t[lo:lo + batch]).to(dev), _batch_labels(labels, lo, batch, dev)
        for s_from, s_to in zip(ends, ends[1:]):
            x = model.jump(x, torch.tensor(s_from, device=dev), torch.tensor(s_to, device=dev), y)
        out.append(x.cpu().numpy())
    return np.concatenate(out)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [−1, 1], NCHW float → uint8 NHWC (NVlabs/edm's rounding: (x + 1)·127.5, clipped)."""
    return np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def shard_seeds(seeds: np.ndarray, shard: int, shards: int) -> np.ndarray:
    """Contiguous block `shard` of `shards` (merging the blocks in order restores the seed order)."""
    return np.array_split(seeds, shards)[shard]


def load_weights(rdir: Path, step: int | None = None) -> dict:
    """The final weights or a snapshot, verified; a damaged or absent snapshot names the fix."""
    if step is None:
        return checkpoint.load_final(rdir)
    path = paths.weights_file(rdir, step)
    try:
        return checkpoint.load(path, checkpoint.SNAPSHOT_REQUIRED)
    except (FileNotFoundError, DamagedFile) as e:
        raise DamagedFile(f"{path}: {'no such file' if isinstance(e, FileNotFoundError) else e}; delete it and "
                          f"re-run snakemake (training redoes the steps up to it)") from None


def training_cost(rdir: Path, step: int | None, weights: dict) -> dict:
    """Training wall seconds and FLOPs up to the weights sampled, for the metric records: a snapshot holds them;
    final.pt does not (its bytes depend on the weights alone), the checkpoint of its step does. None where
    absent (files of older versions, a deleted checkpoint)."""
    if step is None:
        try:
            weights = checkpoint.load(checkpoint.ckpt_path(paths.checkpoints_dir(rdir), weights["step"]))
        except (FileNotFoundError, DamagedFile):
            weights = {}
    return {k: weights.get(k) for k in ("train_seconds", "train_flops")}


def sample_run(rdir: Path, nfe: int, out: Path | None = None, shard: int = 0, shards: int = 1) -> Path:
    """Sample a finished run with the sampling EMA (its seeds' shard `shard` of `shards`): the final weights
    into `out` (default: the run's samples file), then, unless `out` is given, each EMA snapshot of
    evaluate.every into its own samples file. Returns the final weights' samples file."""
    rdir = Path(rdir)
    final = sample_weights(rdir, nfe, None, out, shard, shards)
    for step in [] if out else load_run_config(rdir).evaluated_steps():
        sample_weights(rdir, nfe, step, None, shard, shards)
    return final


def sample_weights(rdir: Path, nfe: int, step: int | None, out: Path | None = None, shard: int = 0,
                   shards: int = 1) -> Path:
    """Sample one set of weights (step None: final.pt); writes an npz with the samples (or uint8 images),
    seeds, class labels (conditional data: one per seed), the σ list and a JSON `meta` describing how they
    were made."""
    cfg, weights = load_run_config(rdir), load_weights(rdir, step)
    if nfe not in cfg.sample.nfe:
        raise ValueError(f"{rdir}: NFE {nfe} is not in sample.nfe {cfg.sample.nfe}")
    torch.set_num_threads(cfg.train.threads)
    model = build_model(cfg)
    model.load_state_dict(weights["ema"])
    model.to(devices.device()).eval()
    sigmas, smp, image = cfg.sigma_list(nfe), cfg.sample, isinstance(cfg.dataset, ImageData)
    seeds = shard_seeds(sample_seeds(cfg), shard, shards)
    labels = seed_labels(seeds, cfg.dataset.num_classes) if cfg.dataset.conditional else None
    parts, starts = [], []
    for lo in range(0, len(seeds), smp.batch):
        s, y = seeds[lo:lo + smp.batch], None if labels is None else labels[lo:lo + smp.batch]
        x_t = memo_noise(("x_t", s.tobytes(), tuple(cfg.dataset.shape), sigmas[0]),
                         lambda: initial_noise(cfg, nfe, s))
        starts.append(x_t)
        if smp.sampler == "heun":
            x = ode_sample(model, sigmas, x_t, smp.batch, y)
        elif smp.sampler == "flowmap":
            x = flowmap_sample(model, sigmas, x_t, smp.batch, y)
        else:
            x = consistency_sample(model, sigmas, s, x_t, cfg.precond.sigma_min, smp.batch, smp.renoise,
                                   smp.clip_denoised, y)
        parts.append(to_uint8(x) if image else x)
    consistency = smp.sampler == "consistency"
    meta = {"config_hash": cfg.hash, "sample_hash": cfg.sample_hash(nfe),
            "checkpoint_sha256": io.file_sha256(paths.weights_file(rdir, step))[:16], "weights": "ema", "nfe": nfe,
            "step": weights["step"], **training_cost(rdir, step, weights),
            "sigmas": sigmas, "sigma_min": cfg.precond.sigma_min,
            "sampler": smp.sampler, "renoise": smp.renoise if consistency else None,
            "clip_denoised": smp.clip_denoised if consistency else None, "conditional": cfg.dataset.conditional}
    arrays = {"seeds": seeds, "sigmas": np.array(sigmas), "meta": json.dumps(meta)}
    if labels is not None:
        arrays["labels"] = labels
    if image:
        arrays["images"] = np.concatenate(parts)
    else:   # toy: float samples and x_T, which evaluation checks against the cached exact endpoints
        arrays.update(samples=np.concatenate(parts), x_t=np.concatenate(starts))
    out = Path(out) if out else (paths.samples_file(rdir, nfe, step) if shards == 1
                                 else paths.samples_shard(rdir, nfe, shard, shards, step))
    return io.save_npz(out, **arrays)


def merge_shards(rdir: Path, nfe: int, shards: int) -> Path:
    """Concatenate the shards of a sampled run (in seed order) into its samples files, the final weights' and
    each snapshot's; the shards are removed. Returns the final weights' samples file."""
    for step in load_run_config(rdir).evaluated_steps():
        _merge(rdir, nfe, step, shards)
    return _merge(rdir, nfe, None, shards)


def _merge(rdir: Path, nfe: int, step: int | None, shards: int) -> Path:
    files = [paths.samples_shard(rdir, nfe, i, shards, step) for i in range(shards)]
    loaded = [np.load(f) for f in files]
    meta = {str(z["meta"]) for z in loaded}
    if len(meta) != 1:
        raise ValueError(f"{rdir}: shards of NFE {nfe} were sampled from different weights or settings")
    arrays = {k: np.concatenate([z[k] for z in loaded]) for k in loaded[0].files if k not in ("meta", "sigmas")}
    out = io.save_npz(paths.samples_file(rdir, nfe, step), **arrays, sigmas=loaded[0]["sigmas"], meta=meta.pop())
    for f in files:
        f.unlink()
    return out
