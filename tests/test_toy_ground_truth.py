"""Closed-form checks of the toy ground truth (papers.md §8.1, §8.3)."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

from cmbench.data.toy import Gaussian, GaussianMixture, integrate_pf_ode, make_toy
from cmbench.metrics.toy import near_mode

SIGMA_MIN = 0.002
RING = {"kind": "gmm", "layout": "ring", "dim": 2, "modes": 8, "radius": 1.0, "std": 0.05}


def noised(dist, sigma, n, rng):
    """Draws from p_sigma: data plus sigma-scaled Gaussian noise; sigma scalar or [n]."""
    return dist.sample(n, rng) + np.reshape(sigma, (-1, 1)) * rng.standard_normal((n, dist.dim))


def random_gmm(dim=3):
    rng = np.random.default_rng(1)
    return GaussianMixture(rng.normal(size=(4, dim)), [0.1, 0.3, 0.5, 0.2], [0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("dim", [1, 3])
def test_gaussian_consistency_map_matches_ode(dim):
    gauss = Gaussian(np.linspace(-0.5, 0.5, dim), 0.5)
    rng = np.random.default_rng(0)
    # One integration with a different starting sigma per point also exercises the per-point time.
    sigma = np.repeat([80.0, 10.0, 1.0, 0.1, 0.01], 40)
    x = noised(gauss, sigma, len(sigma), rng)
    ode = integrate_pf_ode(gauss.denoiser, x, sigma, SIGMA_MIN)
    np.testing.assert_allclose(ode, gauss.consistency_map(x, sigma, SIGMA_MIN), rtol=0, atol=1e-6)


def test_gaussian_flow_keeps_standardised_coordinate():
    # (x - mu) / sqrt(s^2 + sigma^2) is invariant along trajectories (§8.1).
    gauss = Gaussian([0.3, -1.0], 0.5)
    x = np.random.default_rng(0).normal(size=(5, 2))
    y = gauss.flow(x, 3.0, 0.2)
    np.testing.assert_allclose(
        (y - gauss.mean) / np.hypot(0.5, 0.2), (x - gauss.mean) / np.hypot(0.5, 3.0), rtol=1e-12
    )


@pytest.mark.parametrize("dist", [Gaussian([0.3], 0.5), make_toy(RING)], ids=["gaussian", "ring"])
def test_consistency_map_is_identity_at_boundary(dist):
    x = np.random.default_rng(0).normal(size=(50, dist.dim))
    np.testing.assert_allclose(dist.consistency_map(x, SIGMA_MIN, SIGMA_MIN), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sigma", [0.01, 0.3, 2.0, 80.0])
def test_gmm_score_is_gradient_of_log_density(sigma):
    gmm = random_gmm()

    def log_density(x):  # independent evaluation with scipy, components N(mu_k, (s_k^2 + sigma^2) I)
        parts = [
            np.log(w) + multivariate_normal(mu, (s**2 + sigma**2) * np.eye(3)).logpdf(x)
            for mu, s, w in zip(gmm.means, gmm.stds, gmm.weights)
        ]
        return logsumexp(parts, axis=0)

    x = noised(gmm, sigma, 20, np.random.default_rng(0))
    h = 1e-5 * max(1.0, sigma)
    grad = np.stack(
        [(log_density(x + h * e) - log_density(x - h * e)) / (2 * h) for e in np.eye(3)], axis=1
    )
    np.testing.assert_allclose(gmm.score(x, sigma), grad, rtol=1e-6, atol=1e-6 / max(1.0, sigma))


def test_gmm_denoiser_is_tweedie():
    gmm = random_gmm()
    rng = np.random.default_rng(0)
    sigma = np.geomspace(SIGMA_MIN, 80.0, 30)
    x = noised(gmm, sigma, 30, rng)
    expected = x + sigma[:, None] ** 2 * gmm.score(x, sigma)
    np.testing.assert_allclose(gmm.denoiser(x, sigma), expected, rtol=1e-9, atol=1e-9)


def test_one_component_gmm_flow_matches_gaussian():
    mean = np.array([0.3, -0.7])
    gmm, gauss = GaussianMixture(mean[None], [0.5], [1.0]), Gaussian(mean, 0.5)
    x = noised(gauss, 80.0, 200, np.random.default_rng(0))
    np.testing.assert_allclose(
        gmm.consistency_map(x, 80.0, SIGMA_MIN), gauss.consistency_map(x, 80.0, SIGMA_MIN), atol=1e-6
    )


def test_ring_flow_transports_noised_law_to_data():
    # The exact PF ODE carries p_80 to p_0.002, so its outputs look like ring data, and it is invertible.
    ring = make_toy(RING)
    rng = np.random.default_rng(0)
    x = noised(ring, 80.0, 2000, rng)
    y = ring.consistency_map(x, 80.0, SIGMA_MIN)
    fraction, coverage = near_mode(y, ring.means, ring.stds, ring.weights)
    assert abs(fraction - 0.989) < 0.01
    np.testing.assert_allclose(coverage, 1.0, atol=0.25)
    np.testing.assert_allclose(ring.flow(y[:100], SIGMA_MIN, 80.0), x[:100], rtol=1e-6)


@pytest.mark.parametrize("dist", [Gaussian([0.3, -0.2], 0.5), random_gmm()], ids=["gaussian", "gmm"])
def test_samples_match_exact_moments(dist):
    n = 200_000
    x = dist.sample(n, np.random.default_rng(0))
    t = dist.sample_torch(n, torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == (n, dist.dim)
    for s in (x, t.double().numpy()):
        np.testing.assert_allclose(s.mean(0), dist.mean, atol=0.01)
        np.testing.assert_allclose(np.cov(s, rowvar=False), dist.cov, atol=0.02)


def test_sample_torch_reproducible_from_generator_state():
    ring = make_toy(RING)
    gen = torch.Generator().manual_seed(123)
    state = gen.get_state()
    first = ring.sample_torch(64, gen)
    assert not torch.equal(first, ring.sample_torch(64, gen))
    gen.set_state(state)
    assert torch.equal(first, ring.sample_torch(64, gen))
    torch.manual_seed(999)  # the global generator must not matter
    assert torch.equal(first, ring.sample_torch(64, torch.Generator().manual_seed(123)))


def test_gmm_mixture_moments_closed_form():
    # Two symmetric modes at +-1 with std s: mean 0, variance 1 + s^2 along the axis, s^2 across.
    gmm = GaussianMixture([[1.0, 0.0], [-1.0, 0.0]], [0.2, 0.2], [1, 1])
    np.testing.assert_allclose(gmm.weights, [0.5, 0.5])
    np.testing.assert_allclose(gmm.mean, [0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(gmm.cov, np.diag([1.04, 0.04]), rtol=1e-12)


def test_make_toy_specs():
    gauss = make_toy({"kind": "gaussian", "dim": 3, "mean": 0.3, "std": 0.5, "name": "ignored"})
    assert isinstance(gauss, Gaussian)
    np.testing.assert_array_equal(gauss.mean, [0.3, 0.3, 0.3])
    np.testing.assert_allclose(gauss.cov, 0.25 * np.eye(3))

    ring = make_toy(RING)
    angles = 2 * np.pi * np.arange(8) / 8
    np.testing.assert_allclose(ring.means, np.stack([np.cos(angles), np.sin(angles)], 1), atol=1e-15)
    np.testing.assert_allclose(ring.stds, 0.05)
    np.testing.assert_allclose(ring.weights, 1 / 8)

    spec = {"kind": "gmm", "layout": "random", "dim": 8, "modes": 4, "radius": 2.0, "std": 0.1, "layout_seed": 0}
    rand = make_toy(spec)
    assert rand.means.shape == (4, 8)
    np.testing.assert_allclose(np.linalg.norm(rand.means, axis=1), 2.0)
    np.testing.assert_array_equal(make_toy(spec).means, rand.means)
    assert not np.allclose(make_toy({**spec, "layout_seed": 1}).means, rand.means)


def test_make_toy_rejects_ring_outside_2d():
    with pytest.raises(ValueError, match="dim"):
        make_toy({**RING, "dim": 3})
