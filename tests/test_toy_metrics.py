"""Checks of the toy metrics against closed forms (papers.md §8.4, calibration.md)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.linalg import sqrtm

import cmbench.metrics.toy as toy_metrics
from cmbench.data.toy import make_toy
from cmbench.metrics.toy import frechet_distance, gaussian_w2, near_mode, ode_error, sliced_w2

RING = {"kind": "gmm", "layout": "ring", "dim": 2, "modes": 8, "radius": 1.0, "std": 0.05}


def exact_moment_samples(mean, cov, n=1000, seed=0):
    """Samples whose sample mean and (ddof=1) covariance are exactly mean and cov."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mean + z @ np.linalg.cholesky(cov).T


def frechet_closed_form(m1, s1, m2, s2):
    """Squared W2 between Gaussians via scipy's general matrix square root (§8.4)."""
    r = sqrtm(s2)
    return np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * sqrtm(r @ s1 @ r)).real


M1, S1 = np.array([0.3, -0.2]), np.array([[1.0, 0.6], [0.6, 0.5]])
M2, S2 = np.array([-0.4, 0.5]), np.array([[0.2, -0.1], [-0.1, 2.0]])  # does not commute with S1


def test_gaussian_w2_exact_cases():
    x = exact_moment_samples(M1, S1)
    assert gaussian_w2(x, M1, S1) < 1e-7
    shift = np.array([0.3, -0.4])
    assert gaussian_w2(x + shift, M1, S1) == pytest.approx(0.5, abs=1e-7)
    # Isotropic stds 0.5 vs 0.8 in d = 3: W2 = sqrt(d) * |0.5 - 0.8| (§8.4).
    y = exact_moment_samples(np.zeros(3), 0.64 * np.eye(3))
    assert gaussian_w2(y, np.zeros(3), 0.25 * np.eye(3)) == pytest.approx(np.sqrt(3) * 0.3, rel=1e-9)


def test_gaussian_w2_large_sample_near_zero():
    gauss = make_toy({"kind": "gaussian", "dim": 1, "mean": 0.3, "std": 0.5})
    x = gauss.sample(200_000, np.random.default_rng(0))
    assert gaussian_w2(x, gauss.mean, gauss.cov) < 0.005  # calibration.md: ~0.001 at n = 200k


def test_frechet_distance_identity_and_positivity():
    a = np.random.default_rng(0).normal(size=(500, 2))
    assert frechet_distance(a, a) < 1e-12
    assert frechet_distance(a, a * 1.1) > 0
    d1 = np.random.default_rng(1).normal(size=300)  # flat 1-D input
    assert frechet_distance(d1, d1) < 1e-12
    assert frechet_distance(d1, d1 + 2.0) == pytest.approx(4.0, rel=1e-9)


def test_frechet_distance_matches_closed_form():
    expected = frechet_closed_form(M1, S1, M2, S2)
    exact = frechet_distance(exact_moment_samples(M1, S1), exact_moment_samples(M2, S2, seed=1))
    assert exact == pytest.approx(expected, rel=1e-9)
    rng = np.random.default_rng(0)
    sampled = frechet_distance(
        rng.multivariate_normal(M1, S1, 200_000), rng.multivariate_normal(M2, S2, 200_000)
    )
    assert sampled == pytest.approx(expected, rel=0.02)


def test_sliced_w2():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1000, 2))
    assert sliced_w2(a, a) == 0.0
    assert sliced_w2(a, np.repeat(a, 3, axis=0)) < 1e-12  # same empirical law, unequal counts
    # In 1-D every direction is +-1, so a shift by c gives exactly |c|.
    assert sliced_w2(a[:, :1], a[:, :1] + 0.7) == pytest.approx(0.7, rel=1e-12)
    # In d dims, E[(theta . c)^2] = |c|^2 / d over uniform directions.
    shift = np.array([0.6, 0.8])
    assert sliced_w2(a, a + shift, n_projections=4096) == pytest.approx(np.sqrt(0.5), rel=0.03)
    assert sliced_w2(a, a + shift, seed=1) != sliced_w2(a, a + shift, seed=2)


def test_sliced_w2_unequal_counts_exact():
    # Empirical {0, 1} vs {0, 0, 1}: quantile functions differ by 1 on u in (1/2, 2/3), so W2^2 = 1/6.
    assert sliced_w2([0.0, 1.0], [0.0, 0.0, 1.0]) == pytest.approx(np.sqrt(1 / 6), rel=1e-12)


def test_near_mode_on_ring():
    ring = make_toy(RING)
    x = ring.sample(40_000, np.random.default_rng(0))
    fraction, coverage = near_mode(x, ring.means, ring.stds, ring.weights)
    assert fraction == pytest.approx(1 - np.exp(-4.5), abs=0.003)  # 0.989, calibration.md
    np.testing.assert_allclose(coverage, 1.0, atol=0.05)

    fraction, coverage = near_mode(np.zeros((100, 2)), ring.means, ring.stds, ring.weights)
    assert fraction == 0.0
    np.testing.assert_array_equal(coverage, 0.0)


def test_near_mode_coverage_detects_dropped_mode():
    ring = make_toy(RING)
    x = ring.sample(8000, np.random.default_rng(0))
    kept = x[np.linalg.norm(x - ring.means[0], axis=1) > 0.5]  # remove mode 0
    _, coverage = near_mode(kept, ring.means, ring.stds, ring.weights)
    assert coverage[0] == 0.0
    assert np.all(coverage[1:] > 1.0)  # the remaining modes hold more than their true share


def test_ode_error():
    exact = np.random.default_rng(0).normal(size=(50, 3))
    assert ode_error(exact, exact) == 0.0
    assert ode_error(exact + np.array([1.0, 2.0, 2.0]), exact) == pytest.approx(9.0)


def test_metrics_module_does_not_import_torch():
    # Load the file on its own in a fresh interpreter so package __init__ files cannot interfere.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(Path(toy_metrics.__file__))!r})\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_frechet_to_stats_low_rank_path_equals_the_full_formula():
    """Fewer samples than dimensions: the n × n form of the trace term gives the full d × d formula's value."""
    rng = np.random.default_rng(0)
    for d, n in [(3, 2), (40, 10), (200, 50)]:
        ref = rng.standard_normal((d + 30, d)) @ (0.3 * rng.standard_normal((d, d)))
        mean, cov = ref.mean(0), np.cov(ref, rowvar=False)
        x = 0.5 + rng.standard_normal((n, d))
        full = toy_metrics._frechet(*toy_metrics._gaussian_fit(x), mean, cov)
        assert toy_metrics.frechet_to_stats(x, mean, cov) == pytest.approx(full, rel=1e-7)
    assert toy_metrics.frechet_to_stats(ref[:5], mean, cov) > 0
