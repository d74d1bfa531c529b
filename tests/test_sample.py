"""Sampling: per-sample seeds make samples independent of batch size; the σ list and re-noising are honoured."""
import numpy as np
import pytest
import torch

from cmbench import paths
from cmbench.config import Experiment, load_run_config, write_run_config
from cmbench.sample import consistency_sample, sample_run
from cmbench.seeds import seed_noise
from cmbench.train import loop
from cmbench.checks import check_run
from conftest import REPO


def test_noise_depends_only_on_seed_and_stream():
    a = seed_noise(np.arange(10), (3,), 0)
    assert np.array_equal(a[4:7], seed_noise(np.arange(4, 7), (3,), 0))
    assert not np.allclose(a, seed_noise(np.arange(10), (3,), 1))


def test_samples_do_not_depend_on_batch_size(tmp_path):
    overrides = {"train": {"steps": 30, "batch": 16}, "sample": {"n": 300}}
    cfg = check_run(Experiment(REPO / "configs").resolve("toy", "ring2d", "ict", 0, overrides))
    rdir = paths.run_dir(tmp_path, cfg.run)
    loop.train(cfg, rdir, progress=False)
    big = np.load(sample_run(rdir, 2, tmp_path / "big.npz"))
    # the same run with sampling batches of 7 (300 = 42·7 + 6: a ragged last batch); checked, not assumed
    write_run_config(cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"batch": 7})}), rdir)
    assert cfg.sample.batch > 300 and load_run_config(rdir).sample.batch == 7
    small = np.load(sample_run(rdir, 2, tmp_path / "small.npz"))
    assert np.array_equal(big["seeds"], small["seeds"]) and np.array_equal(big["x_t"], small["x_t"])
    np.testing.assert_allclose(big["samples"], small["samples"], rtol=0, atol=1e-6)
    assert big["samples"].shape == (300, 2) and list(big["sigmas"]) == [80.0, 0.8]


class ExactGaussian(torch.nn.Module):
    """The exact consistency function of N(μ, s²) (papers.md §8.1) as a model."""

    def __init__(self, mu, s, eps):
        super().__init__()
        self.mu, self.s, self.eps = mu, s, eps

    def forward(self, x, sigma, labels=None):
        x = x.double()
        return self.mu + (x - self.mu) * np.sqrt(self.s**2 + self.eps**2) / (self.s**2 + sigma.double() ** 2).sqrt()


@pytest.mark.parametrize("sigmas", [[80.0], [80.0, 0.8]])
def test_exact_model_reproduces_the_analytic_sample_law(sigmas):
    # With the exact f*, 1 step maps N(0, T²) to N(μ(1 − r), (rT)²), r = sqrt((s² + ε²)/(s² + T²)) (papers.md
    # §8.1, prior mismatch); a 2nd step at τ re-noises by sqrt(τ² − ε²) and maps back with f*(·, τ).
    mu, s, eps, n = 0.3, 0.5, 0.002, 100_000
    seeds = np.arange(n)
    x_t = (sigmas[0] * seed_noise(seeds, (1,), 0))
    out = consistency_sample(ExactGaussian(mu, s, eps), sigmas, seeds, x_t, eps, batch=50_000)
    r = np.sqrt((s**2 + eps**2) / (s**2 + sigmas[0] ** 2))
    mean, var = mu * (1 - r), (r * sigmas[0]) ** 2
    if len(sigmas) == 2:
        tau = sigmas[1]
        a = np.sqrt((s**2 + eps**2) / (s**2 + tau**2))
        mean, var = mu + a * (mean - mu), a**2 * (var + tau**2 - eps**2)
    se = np.sqrt(var / n)
    assert abs(out.mean() - mean) < 5 * se
    assert abs(out.var() - var) < 5 * var * np.sqrt(2 / n)


class Overshoot(torch.nn.Module):
    """Denoises to 3·x clipped at ±4: outside [−1, 1], so a clamp before re-noising shows in the output."""

    def forward(self, x, sigma, labels=None):
        return (3 * x).clamp(-4, 4) if float(sigma.reshape(-1)[0]) > 50 else x


def test_clip_denoised_clamps_before_renoising():
    """CM's sampler (clip_denoised) clamps each step's denoised image to [−1, 1] before adding the next step's
    noise; without the clamp the overshoot is carried into the second step."""
    seeds = np.arange(64)
    x_t = 80 * seed_noise(seeds, (1, 2, 2), 0).astype(np.float32)
    clipped = consistency_sample(Overshoot(), [80.0, 0.5], seeds, x_t, 0.002, 64, "plain", clip_denoised=True)
    plain = consistency_sample(Overshoot(), [80.0, 0.5], seeds, x_t, 0.002, 64, "plain")
    z = 0.5 * seed_noise(seeds, (1, 2, 2), 1).astype(np.float32)
    np.testing.assert_allclose(clipped, np.clip(np.clip(3 * x_t, -4, 4), -1, 1) + z, atol=1e-6)
    np.testing.assert_allclose(plain, np.clip(3 * x_t, -4, 4) + z, atol=1e-6)
