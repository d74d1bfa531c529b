"""ode_ground_truth: the toy suite's exact PF-ODE map (one vectorised system) vs scipy's solve_ivp called per
point."""
import math
import time

import numpy as np

from benchmarks.common import TARGETS, median


def _reference_flow(mix, x, sigma_from: float, sigma_to: float, rtol: float, atol: float) -> np.ndarray:
    """The exact map of one point by scipy's solve_ivp (DOP853), its own denoiser: the reference for the
    vectorised integrator. Same ODE in the same variable: dx/ds = ln(σ_to/σ_from)·(x − D(x, σ(s))),
    ln σ(s) = (1 − s) ln σ_from + s ln σ_to."""
    from scipy.integrate import solve_ivp
    means, var0, logw, d = mix.means, mix.stds**2, np.log(mix.weights), mix.means.shape[1]
    la, lb = math.log(sigma_from), math.log(sigma_to)

    def denoise(y, sigma):
        var = var0 + sigma * sigma
        diff = y - means                                        # [K, d]
        logp = logw - 0.5 * ((diff * diff).sum(1) / var + d * np.log(2 * np.pi * var))
        p = np.exp(logp - logp.max())
        p /= p.sum()
        return p @ (means + (var0 / var)[:, None] * diff)

    def rhs(s, y):
        return (lb - la) * (y - denoise(y, math.exp(la + s * (lb - la))))

    sol = solve_ivp(rhs, (0.0, 1.0), np.asarray(x, dtype=np.float64), method="DOP853", rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(sol.message)
    return sol.y[:, -1]


def bench_ode(sizes: dict, configs) -> dict:
    from cmbench.config import Experiment
    from cmbench.data import toy
    from cmbench.seeds import initial_noise
    n, m = sizes["ode_n"], sizes["ode_ref_n"]
    cfg = Experiment(configs).resolve("toy", "ring2d", "ict", 0, {"sample": {"n": n}})
    mix = toy.make_toy(cfg.dataset.model_dump())
    sigma_from, sigma_to = cfg.sigma_list(1)[0], cfg.precond.sigma_min
    x = initial_noise(cfg, 1).astype(np.float64)            # the suite's x_T: 10k seeds, σ 80
    full = []
    for _ in range(sizes["repeats"]):
        t0 = time.perf_counter()
        exact = mix.consistency_map(x, sigma_from, sigma_to)
        full.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    ref = np.stack([_reference_flow(mix, x[i], sigma_from, sigma_to, toy.RTOL, toy.ATOL) for i in range(m)])
    ref_s = time.perf_counter() - t0
    diff = float(np.abs(ref - exact[:m]).max())
    extrapolated = ref_s * n / m
    ratio = median(full) / extrapolated
    met = ratio <= TARGETS["ode_ratio"] and diff <= TARGETS["ode_diff"]
    return {
        "benchmark": "ode_ground_truth",
        "title": f"exact PF-ODE map of {n} ring2d points (σ {sigma_from:g} → {sigma_to:g})",
        "method": f"cmbench.data.toy.GaussianMixture.consistency_map: one vectorised DOP853 system in ln σ, "
                  f"rtol = atol = {toy.RTOL:g}",
        "baseline": f"scipy solve_ivp (DOP853, same ODE in ln σ, same tolerances) called per point with its own "
                    f"mixture denoiser, timed on the first {m} points and extrapolated linearly to {n}",
        "points": n, "reference_points": m,
        "timings": {"cmbench_s": full, "reference_subset_s": ref_s, "reference_extrapolated_s": extrapolated},
        "cmbench_s": median(full), "max_abs_diff": diff,
        "ratio": ratio,
        "target": {"op": "<=", "value": TARGETS["ode_ratio"], "max_abs_diff": TARGETS["ode_diff"],
                   "source": "issue #7 sets none; recorded: no slower than the per-point reference, and the 1e-6 "
                             "accuracy target of cmbench/data/toy.py"},
        "met": met,
        "measured": f"{median(full):.3g} s vs {extrapolated:.3g} s (extrapolated), max abs Δ {diff:.1e}",
        "notes": f"reference extrapolated from {m} points; max abs difference of the two maps on those points "
                 f"{diff:.2e}.",
    }
