"""Few-step consistency sampling on an explicit σ list, with per-sample seeds (cmbench.seeds)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from cmbench import paths, solvers
from cmbench.config import load_run_config
from cmbench.nets import build_model
from cmbench.seeds import initial_noise, sample_seeds, seed_noise
from cmbench.train import checkpoint


RENOISE = {"cm": lambda sigma, sigma_min: float(np.sqrt(sigma**2 - sigma_min**2)),   # CM Alg. 1, iCT
           "plain": lambda sigma, sigma_min: float(sigma)}                              # ECT, sCM (papers.md §9.8)


@torch.no_grad()
def consistency_sample(model, sigmas: list[float], seeds: np.ndarray, x_t: np.ndarray, sigma_min: float,
                       batch: int, renoise: str = "cm") -> np.ndarray:
    """CM multistep sampler (Song et al. 2023, Alg. 1): x ← f(x_T, σ_0); for σ_k, k ≥ 1:
    x ← f(x + s_k·z_k, σ_k) with s_k from RENOISE. One step when len(sigmas) == 1."""
    out = []
    for lo in range(0, len(seeds), batch):
        s, x = seeds[lo:lo + batch], torch.from_numpy(x_t[lo:lo + batch])
        x = model(x, torch.tensor(sigmas[0]))
        for k, sigma in enumerate(sigmas[1:], start=1):
            z = torch.from_numpy(seed_noise(s, tuple(x.shape[1:]), k).astype(np.float32))
            x = model(x + RENOISE[renoise](sigma, sigma_min) * z, torch.tensor(sigma))
        out.append(x.numpy())
    return np.concatenate(out)


@torch.no_grad()
def ode_sample(model, sigmas: list[float], x_t: np.ndarray, batch: int) -> np.ndarray:
    """A denoiser sampled with EDM's deterministic Heun sampler (Alg. 1) over σ list + 0."""
    return np.concatenate([solvers.sample_ode(model, torch.from_numpy(x_t[lo:lo + batch]), sigmas).numpy()
                           for lo in range(0, len(x_t), batch)])


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def sample_run(rdir: Path, nfe: int, out: Path | None = None) -> Path:
    """Sample a finished run with the sampling EMA; writes an npz with samples, seeds, x_T and the σ list."""
    rdir = Path(rdir)
    cfg, final = load_run_config(rdir), checkpoint.load(paths.final_weights(rdir))
    if nfe not in cfg.sample.nfe:
        raise ValueError(f"{rdir}: NFE {nfe} is not in sample.nfe {cfg.sample.nfe}")
    torch.set_num_threads(cfg.train.threads)
    model = build_model(cfg)
    model.load_state_dict(final["ema"])
    model.eval()
    sigmas, seeds, x_t, smp = cfg.sigma_list(nfe), sample_seeds(cfg), initial_noise(cfg, nfe), cfg.sample
    if smp.sampler == "heun":
        samples = ode_sample(model, sigmas, x_t, smp.batch)
    else:
        samples = consistency_sample(model, sigmas, seeds, x_t, cfg.precond.sigma_min, smp.batch, smp.renoise)
    out = Path(out) if out else paths.samples_file(rdir, nfe)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config_hash": cfg.hash, "checkpoint_sha256": file_sha256(paths.final_weights(rdir)),
            "weights": "ema", "nfe": nfe, "sigmas": sigmas, "sigma_min": cfg.precond.sigma_min,
            "sampler": smp.sampler, "renoise": smp.renoise if smp.sampler == "consistency" else None}
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, samples=samples, seeds=seeds, x_t=x_t, sigmas=np.array(sigmas), meta=json.dumps(meta))
    tmp.replace(out)
    return out
