"""Few-step consistency sampling on an explicit σ list, with per-sample seeds (cmbench.seeds)."""
import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from cmbench import paths
from cmbench.config import load_run_config
from cmbench.nets import build_model
from cmbench.seeds import initial_noise, sample_seeds, seed_noise
from cmbench.train import checkpoint


@torch.no_grad()
def consistency_sample(model, sigmas: list[float], seeds: np.ndarray, x_t: np.ndarray, sigma_min: float,
                       batch: int) -> np.ndarray:
    """CM multistep sampler (Song et al. 2023, Alg. 1): x ← f(x_T, σ_0); for σ_k, k ≥ 1:
    x ← f(x + sqrt(σ_k² − σ_min²)·z_k, σ_k). One step when len(sigmas) == 1."""
    out = []
    for lo in range(0, len(seeds), batch):
        s, x = seeds[lo:lo + batch], torch.from_numpy(x_t[lo:lo + batch])
        x = model(x, torch.tensor(sigmas[0]))
        for k, sigma in enumerate(sigmas[1:], start=1):
            z = torch.from_numpy(seed_noise(s, tuple(x.shape[1:]), k).astype(np.float32))
            x = model(x + float(np.sqrt(sigma**2 - sigma_min**2)) * z, torch.tensor(sigma))
        out.append(x.numpy())
    return np.concatenate(out)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def sample_run(rdir: Path, nfe: int, out: Path | None = None) -> Path:
    """Sample a finished run with the sampling EMA; writes an npz with samples, seeds, x_T and the σ list."""
    rdir = Path(rdir)
    cfg, final = load_run_config(rdir), checkpoint.load(paths.final_weights(rdir))
    if str(nfe) not in cfg.sample.sigmas:
        raise ValueError(f"{rdir}: no σ list for NFE {nfe} in sample.sigmas (have {sorted(cfg.sample.sigmas)})")
    torch.set_num_threads(cfg.train.threads)
    model = build_model(cfg)
    model.load_state_dict(final["ema"])
    model.eval()
    sigmas, seeds, x_t = cfg.sample.sigmas[str(nfe)], sample_seeds(cfg), initial_noise(cfg, nfe)
    samples = consistency_sample(model, sigmas, seeds, x_t, cfg.precond.sigma_min, cfg.sample.batch)
    out = Path(out) if out else paths.samples_file(rdir, nfe)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"config_hash": cfg.hash, "checkpoint_sha256": file_sha256(paths.final_weights(rdir)),
            "weights": "ema", "nfe": nfe, "sigmas": sigmas, "sigma_min": cfg.precond.sigma_min,
            "renoise": "sqrt(sigma^2 - sigma_min^2)"}
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, samples=samples, seeds=seeds, x_t=x_t, sigmas=np.array(sigmas), meta=json.dumps(meta))
    tmp.replace(out)
    return out
