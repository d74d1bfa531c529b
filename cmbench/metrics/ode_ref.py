"""The ODE error of image runs (Vouitsis et al. 2024, papers.md §6): images have no exact PF-ODE map, so the
reference is the teacher's own: Φ_teacher(x_T), EDM's deterministic Heun sampler (cmbench.solvers.sample_ode) on a
Karras grid of STEPS σ from the student's x_T level down to the teacher's σ_min, then the last step to σ = 0, run
from the same initial noise as the student's 1-step samples (the first evaluate.ode_n sample seeds). Its accuracy
is measured, not assumed: the first CHECK_N solutions again on CHECK_STEPS σ, their discrepancy stored beside Φ
and recorded with every ODE error (`ode_ref_convergence`).

Both sides are compared as the sample files hold images (uint8, clipped to [−1, 1] and rounded: sample.to_uint8),
so a model that returns Φ_teacher(x_T) scores exactly 0; the error itself is the toy's (metrics.toy.ode_error):
the mean over images of the per-image sum of squared differences on the model's [−1, 1] scale.

One file per (teacher run's training hash, seeds, σ_start, grid), shared by every student of that teacher; it
also names the teacher weights' SHA-256, so that retrained teacher weights rebuild it. Numpy only at import (the
workflow computes the key while planning); building it loads torch and the teacher."""
from pathlib import Path

import numpy as np

from cmbench import io, paths
from cmbench.config import ImageData, RunConfig, config_hash
from cmbench.metrics import toy
from cmbench.seeds import initial_noise, sample_seeds, seed_labels

REFERENCE = "ode"     # its name where a metric set's goes: file prefix, `cmbench launch reference --metric ode`
STEPS, CHECK_STEPS, CHECK_N = 256, 512, 16
KEYS = ("images", "seeds", "convergence", "steps", "check_steps", "check_n", "key")   # what the cached file must hold


def applies(cfg: RunConfig, nfe: int) -> bool:
    """An image run with a diffusion teacher (always a trained run on images: the distilled variants, and those
    started from its weights; not TCM, whose teacher is its stage-1 consistency model), at one step."""
    if not (isinstance(cfg.dataset, ImageData) and nfe == 1 and cfg.teacher is not None):
        return False
    from cmbench.losses import LOSSES
    return LOSSES[cfg.loss["name"]].teacher_kind == "denoiser"


def seeds(cfg: RunConfig) -> np.ndarray:
    return sample_seeds(cfg)[:cfg.evaluate.ode_n]


def key(cfg: RunConfig) -> str:
    """What the reference depends on that is known while planning (the file name's key)."""
    return config_hash({"teacher": cfg.teacher.variant, "teacher_hash": cfg.teacher.hash,
                        "seed_start": cfg.sample.seed_start, "n": len(seeds(cfg)), "sigma_start": cfg.sigma_list(1)[0],
                        "solver": "heun", "steps": STEPS, "check": [CHECK_STEPS, CHECK_N]})


def teacher_weights(cfg: RunConfig, results: str | Path) -> Path:
    return paths.final_weights(paths.sibling_run(paths.run_dir(results, cfg.run), cfg.teacher.variant))


def made_for(cfg: RunConfig, results: str | Path) -> str:
    """The key a valid cached file holds: key(cfg) and the teacher weights it was solved with."""
    weights = teacher_weights(cfg, results)
    return f"{key(cfg)}-{io.file_sha256(weights)[:16] if weights.is_file() else 'none'}"


def error(images: np.ndarray, ref_images: np.ndarray) -> float:
    """toy.ode_error of two uint8 image sets on the [−1, 1] scale (x/127.5 − 1: the offsets cancel)."""
    return toy.ode_error(images.astype(np.float64) / 127.5, ref_images.astype(np.float64) / 127.5)


def solution(denoise, x_t: np.ndarray, steps: int, sigma_start: float, precond, batch: int,
             labels: np.ndarray | None = None) -> np.ndarray:
    """Φ(x_t) as uint8 images: Heun on the Karras grid of `steps` σ from sigma_start (x_t's level) to the
    precond's σ_min, then to σ = 0 (2·steps − 1 evaluations of `denoise`)."""
    from cmbench.grids import karras_sigmas
    from cmbench.sample import ode_sample, to_uint8
    sigmas = karras_sigmas(steps, precond.sigma_min, sigma_start, precond.rho)[::-1]
    return to_uint8(ode_sample(denoise, sigmas, x_t, batch, labels))


def build(cfg: RunConfig, out: Path) -> Path:
    """Solve the teacher's PF-ODE from the run's first evaluate.ode_n initial noises (cached under out)."""
    import torch

    from cmbench import devices
    from cmbench.teacher import build_teacher

    results = Path(out).parent.parent      # paths.reference_file: RESULTS/reference/NAME.npz
    torch.set_num_threads(cfg.train.threads)
    teacher = build_teacher(cfg, paths.run_dir(results, cfg.run), devices.device())
    s = seeds(cfg)
    labels = seed_labels(s, cfg.dataset.num_classes) if cfg.dataset.conditional else None
    x_t = initial_noise(cfg, 1, s)

    def phi(steps: int, n: int) -> np.ndarray:
        return solution(teacher.model, x_t[:n], steps, cfg.sigma_list(1)[0], teacher.cfg.precond, cfg.sample.batch,
                        None if labels is None else labels[:n])

    images, check_n = phi(STEPS, len(s)), min(CHECK_N, len(s))
    convergence = error(images[:check_n], phi(CHECK_STEPS, check_n))
    return io.save_npz(out, images=images, seeds=s, convergence=convergence, steps=STEPS, check_steps=CHECK_STEPS,
                       check_n=check_n, key=made_for(cfg, results))
