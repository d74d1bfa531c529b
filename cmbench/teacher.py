"""Teachers for distillation: a denoiser D(x, σ) in EDM σ-space, frozen.

`analytic` is the exact denoiser of toy data (a perfect teacher: distillation error without teacher error);
`run` is the sampling EMA of a trained run of this suite (the `edm` variant), loaded from its final.pt."""
from pathlib import Path

import torch

from cmbench import checkpoint, paths
from cmbench.config import ConfigError, RunConfig, load_run_config
from cmbench.data.toy import make_toy
from cmbench.nets import build_model


class AnalyticTeacher:
    """E[x0 | x_σ = x] of the toy law, computed in float64 (papers.md §8)."""

    def __init__(self, cfg: RunConfig):
        self.dist = make_toy(cfg.dataset.model_dump())

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: None = None) -> torch.Tensor:
        d = self.dist.denoiser(x.detach().double().cpu().numpy(), sigma.detach().double().cpu().numpy())
        return torch.from_numpy(d).to(x.device, x.dtype)


class NetworkTeacher:
    """A trained run's EMA network under its own preconditioning; evaluated without gradients."""

    def __init__(self, rdir: Path, device: torch.device | str = "cpu"):
        self.cfg = load_run_config(rdir)
        final = checkpoint.load_final(rdir)
        self.state, self.trained_by = final["ema"], final["config_hash"]
        self.model = build_model(self.cfg).requires_grad_(False).eval()
        self.model.load_state_dict(self.state)
        self.model.to(device)

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, sigma, labels)


def build_teacher(cfg: RunConfig, rdir: Path, device: torch.device | str = "cpu"):
    if cfg.teacher is None:
        return None
    if cfg.teacher.source == "analytic":
        return AnalyticTeacher(cfg)
    tdir = paths.sibling_run(rdir, cfg.teacher.variant)
    if not paths.final_weights(tdir).exists():
        raise FileNotFoundError(f"teacher run {tdir} has no final.pt: train the '{cfg.teacher.variant}' run first")
    teacher = NetworkTeacher(tdir, device)
    if cfg.teacher.hash is not None and teacher.trained_by != cfg.teacher.hash:
        raise ConfigError(f"teacher run {tdir} holds weights of training config {teacher.trained_by}, but this run was "
                         f"planned against {cfg.teacher.hash}: re-run snakemake (it retrains the teacher first)")
    return teacher
