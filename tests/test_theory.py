"""Theory study (cmbench.studies.theory): closed-form CT recursion on Gaussian data. numpy only, fast."""
import numpy as np
import pandas as pd
import pytest
from scipy.linalg import sqrtm

from cmbench.studies.theory import StudySettings, run_theory_study
from cmbench.studies.theory import model as th

SIGMA_MIN, SIGMA_MAX = th.SIGMA_MIN, th.SIGMA_MAX


def test_population_recursion_converges_to_exact_map():
    """(a) a_N → sqrt((s² + σ_min²)/(s² + σ_max²)), b_N → μ(1 − a_N), with error decreasing in N."""
    mean, std = th.data_params(3, "loguniform", mu=0.3, s_lo=0.1, s_hi=2.0)
    var = std ** 2
    a_star, b_star = th.exact_map(mean, var, SIGMA_MAX, SIGMA_MIN)
    np.testing.assert_allclose(a_star, np.sqrt((var + SIGMA_MIN ** 2) / (var + SIGMA_MAX ** 2)))
    errs = []
    for n in (8, 64, 512, 4096):
        a, b = th.population_recursion(mean, var, th.karras_grid(n))
        np.testing.assert_allclose(b, mean * (1 - a), rtol=0, atol=1e-12)   # offset stays exact given a
        assert np.all(a < a_star)                                         # CT shrinks (Cauchy–Schwarz)
        errs.append(np.abs(a / a_star - 1).max())
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:]))
    assert errs[-1] < 2e-3
    assert errs[-2] / errs[-1] == pytest.approx(8, rel=0.05)                # first order: error ∝ 1/N


def test_population_step_matches_monte_carlo_least_squares():
    """(b) one population regression step equals a least-squares fit on 10^6 samples to ~1e-3."""
    rng = np.random.default_rng(0)
    mu, s, a, b, lo, hi = 0.3, 0.7, 0.9, 0.05, 0.4, 0.9
    x0 = mu + s * rng.standard_normal((10 ** 6, 1))
    z = rng.standard_normal((10 ** 6, 1))
    a_pop, b_pop = th.ct_step_diag(np.array([a]), np.array([b]), th.population_moments([mu], [s * s]), lo, hi)
    a_mc, b_mc = th.ct_step_lstsq(np.array([[a]]), np.array([b]), x0, z, lo, hi)
    assert abs(a_pop[0] - a_mc[0, 0]) < 2e-3
    assert abs(b_pop[0] - b_mc[0]) < 2e-3
    # closed form: a' = a (s² + σ_lo σ_hi)/(s² + σ_hi²), b' = aμ + b − a'μ
    assert a_pop[0] == pytest.approx(a * (s * s + lo * hi) / (s * s + hi * hi))
    assert b_pop[0] == pytest.approx(a * mu + b - a_pop[0] * mu)


def test_moment_steps_equal_explicit_least_squares_on_the_same_samples():
    """The moment-based steps (diagonal and full) are algebraically the least-squares fit on those samples."""
    rng = np.random.default_rng(1)
    d, n, lo, hi = 3, 500, 0.3, 1.1
    x0 = 0.2 + rng.uniform(0.3, 1.5, d) * rng.standard_normal((n, d))
    z = rng.standard_normal((n, d))
    A, b = np.diag([0.9, 1.1, 0.7]) + 0.01 * rng.standard_normal((d, d)), rng.standard_normal(d)
    A_ref, b_ref = th.ct_step_lstsq(A, b, x0, z, lo, hi)
    A_new, b_new = th.ct_step_full(A, b, th.moments_from_samples(x0, z, full=True), lo, hi)
    np.testing.assert_allclose(A_new, A_ref, atol=1e-10)
    np.testing.assert_allclose(b_new, b_ref, atol=1e-10)
    a = np.diag(A).copy()
    a_new, bd_new = th.ct_step_diag(a, b, th.moments_from_samples(x0, z), lo, hi)
    for j in range(d):                                    # diagonal model = one 1-D regression per coordinate
        aj, bj = th.ct_step_lstsq(a[j:j + 1, None], b[j:j + 1], x0[:, j:j + 1], z[:, j:j + 1], lo, hi)
        assert a_new[j] == pytest.approx(aj[0, 0], abs=1e-10)
        assert bd_new[j] == pytest.approx(bj[0], abs=1e-10)


def test_drawn_moments_have_the_law_of_sample_moments():
    """Moments drawn from the Wishart/normal sampling law match those of n explicit draws (mean, sd)."""
    n, reps = 50, 4000
    mean, std = np.array([0.3, -1.0]), np.array([0.5, 2.0])
    drawn = th.draw_moments_diag([np.random.default_rng(2)], np.tile(mean, reps), np.tile(std, reps), n)
    drawn = [np.asarray(f)[0].reshape(reps, 2) for f in drawn]
    rng = np.random.default_rng(3)
    x0 = mean + std * rng.standard_normal((n, reps, 2))
    z = rng.standard_normal((n, reps, 2))
    direct = th.moments_from_samples(x0, z)
    for f_drawn, f_direct in zip(drawn, direct):
        se = f_direct.std(0) / np.sqrt(reps)
        assert np.all(np.abs(f_drawn.mean(0) - f_direct.mean(0)) < 5 * np.sqrt(2) * se + 1e-12)
        np.testing.assert_allclose(f_drawn.std(0), f_direct.std(0), rtol=0.08)
    full = th.draw_moments_full([np.random.default_rng(4)] * 1, mean, std, n)     # shapes and symmetry
    assert full.sxx.shape == (1, 2, 2) and full.sxz.shape == (1, 2, 2) and full.mx.shape == (1, 2)
    np.testing.assert_allclose(full.sxx, full.sxx.swapaxes(-1, -2))
    w = np.stack([np.concatenate([np.concatenate([m.sxx[0], m.sxz[0]], 1),
                                  np.concatenate([m.sxz[0].T, m.szz[0]], 1)])
                  for m in (th.draw_moments_full([np.random.default_rng(k)], mean, std, n) for k in range(2000))])
    expected = (n - 1) / n * np.diag(np.concatenate([std ** 2, [1, 1]]))   # E[scatter/n] = (n−1)/n Σ
    np.testing.assert_allclose(w.mean(0), expected, atol=0.03 * 4)


def test_exact_w2_of_affine_output_law():
    """(c) exact W2 of the affine output law = §8.4 formula; 0 for the exact map with the true prior."""
    d, mu, s = 5, 0.3, 0.5
    mean, std = th.data_params(d, "isotropic", mu=mu, s=s)
    var = std ** 2
    a_star, b_star = th.exact_map(mean, var, SIGMA_MAX, SIGMA_MIN)
    w2_data, w2_x1 = th.affine_output_w2(a_star, b_star, mean, var, "true")
    assert w2_x1 == pytest.approx(0, abs=1e-12)
    assert w2_data == pytest.approx(np.sqrt(d) * (np.sqrt(s * s + SIGMA_MIN ** 2) - s), rel=1e-6)
    # sampler prior N(0, σ_max² I): output N(μ(1 − r), (r σ_max)² I), r = a*; isotropic §8.4 formula
    r = a_star[0]
    w2_s, _ = th.affine_output_w2(a_star, b_star, mean, var, "sampler")
    assert w2_s == pytest.approx(np.sqrt(d * (mu * r) ** 2 + d * (r * SIGMA_MAX - s) ** 2), rel=1e-9)
    assert w2_s / np.sqrt(d) == pytest.approx(0.00187, abs=1e-5)                   # papers.md §8.1 number
    # an arbitrary affine map, against the general formula with scipy's sqrtm
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.001, 0.02, d), rng.normal(0, 0.2, d)
    m_in, v_in = th.prior_law("true", mean, var)
    S1, S2 = np.diag(a ** 2 * v_in), np.diag(var)
    r2 = sqrtm(S2)
    ref = np.sqrt(((a * m_in + b - mean) ** 2).sum() + np.trace(S1 + S2 - 2 * sqrtm(r2 @ S1 @ r2)).real)
    assert th.affine_output_w2(a, b, mean, var, "true")[0] == pytest.approx(ref, rel=1e-8)
    assert th.affine_output_w2_full(np.diag(a), b, mean, var, "true")[0] == pytest.approx(ref, rel=1e-6)
    # general (non-commuting) covariances
    M1, M2 = rng.standard_normal((2, 4, 4))
    C1, C2 = M1 @ M1.T + 0.1 * np.eye(4), M2 @ M2.T + 0.1 * np.eye(4)
    m1, m2 = rng.standard_normal((2, 4))
    r2 = sqrtm(C2)
    ref = np.sqrt(((m1 - m2) ** 2).sum() + np.trace(C1 + C2 - 2 * sqrtm(r2 @ C1 @ r2)).real)
    assert th.w2_gaussian(m1, C1, m2, C2) == pytest.approx(ref, rel=1e-8)
    assert th.w2_gaussian(m1, C1, m1, C1) == pytest.approx(0, abs=1e-6)


def test_loglog_slope_and_n_eps():
    """(d) the slope fit recovers k from c·N^{-k}; N_ε interpolates in log-log."""
    N = 2.0 ** np.arange(2, 13)
    for k, c in [(1.0, 3.0), (0.5, 0.2), (2.5, 7.0)]:
        slope, icpt = th.loglog_slope(N, c * N ** -k)
        assert slope == pytest.approx(-k, abs=1e-10)
        assert np.exp(icpt) == pytest.approx(c, rel=1e-9)
    assert np.isnan(th.loglog_slope([1.0], [1.0])[0])
    err = 3.0 / N
    assert th.n_for_eps(N, err, 0.01) == pytest.approx(300, rel=1e-9)   # exact for a power law
    assert th.n_for_eps(N, err, 10.0) == N[0]
    assert th.n_for_eps(N, err, 1e-6) == np.inf


def test_run_theory_study_tiny(tmp_path):
    """(e) a tiny study writes every file, and no summary cell is blank."""
    tiny = StudySettings(dims=(1, 2, 4), ns=(4, 8, 16, 32, 64), eps=0.05, n_samples=300, seeds=(0, 1), fit_min_n=8,
                         full_dims=(1, 2))
    paths = run_theory_study(tmp_path / "theory", tiny)
    names = {p.name for p in paths}
    assert names == {"theory.csv", "theory_slopes.csv", "theory_summary.md", "theory_summary.tex",
                     "theory.png"}
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    assert not list((tmp_path / "theory").glob(".*tmp*"))                # atomic writes left no temp file
    df = pd.read_csv(tmp_path / "theory" / "theory.csv")
    assert {"d", "N", "method", "prior", "seed", "w2", "w2_floor", "w2_excess", "w2_x1"} <= set(df.columns)
    assert set(df["method"]) >= {"population", "sampled"} and set(df["prior"]) == {"true", "sampler"}
    assert df[["w2", "w2_floor", "w2_x1"]].notna().all().all()
    pop = df[(df["method"] == "population") & (df["prior"] == "true")]
    assert (pop["w2_x1_floor"] < 1e-10).all()
    slopes = pd.read_csv(tmp_path / "theory" / "theory_slopes.csv")
    assert {"slope", "n_eps", "n_eps_d_slope", "bound_d_exponent"} <= set(slopes.columns)
    md = (tmp_path / "theory" / "theory_summary.md").read_text()
    assert "**Findings.**" in md and "nan" not in md.lower().replace("n/a", "")
    table_rows = [ln for ln in md.splitlines() if ln.startswith("|") and not set(ln) <= set("|:- ")]
    assert table_rows
    for ln in table_rows:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        assert all(cells), ln
    assert "not run" in md                                                # full fits skipped d = 4
    tex = (tmp_path / "theory" / "theory_summary.tex").read_text()
    assert r"\begin{tabular}" in tex and "nan" not in tex.lower()
