"""Theory study: how many consistency-training steps N a *perfect* CT learner needs on Gaussian data.

Li, Huang & Wei (2024) (papers.md §7) bound the Wasserstein error of consistency training by order
d^{5/2} log^5 T / T + ε + ε_F, i.e. T ≳ d^{5/2}/ε steps. This study measures the error of CT itself in a
setting where everything is closed form (numpy/scipy/pandas only, no torch):

* data x0 ~ N(μ, diag(s²)) in d dimensions, VE/EDM noising x_σ = x0 + σ z (papers.md §8.1);
* Karras grid σ_1 = σ_min < ... < σ_N = σ_max (ρ = 7; cmbench.grids.karras_sigmas);
* model class: (diagonal or full) affine maps f_i(x) = A_i x + b_i, one per grid point, with the CM
  boundary condition f_1 = identity. The class contains the exact consistency map
  f*(x, σ) = μ + (x − μ)·sqrt((s² + σ_min²)/(s² + σ²)) (covariance diagonal ⇒ the map is diagonal), so
  the approximation error ε_F is zero;
* CT step for the pair (σ_i, σ_{i+1}) (papers.md §2.3): regress the target f_i(x0 + σ_i z) on the input
  x0 + σ_{i+1} z (same z) by least squares. With the population moments of (x0, z) this is what CT with
  an ℓ2 loss converges to with infinite data and a perfect optimiser (``method = population``: pure
  discretisation error). Fitted on n fresh samples per step it adds estimation error
  (``method = sampled``).

The sampler's output f_N(x_{σ_max}) is Gaussian, so its W2 to the data law is exact (papers.md §8.4).
Two inputs (``prior``): ``true`` draws x_{σ_max} from p_{σ_max} = N(μ, diag(s² + σ_max²)) (isolates the
CT error); ``sampler`` draws it from N(0, σ_max² I) as real samplers do (adds the §8.1 prior-mismatch
floor, reported as ``w2_floor``: the exact map's W2 from the same input).

Per (case, model, method, prior, d, N, seed) the tidy table holds
``w2``      W2 to the data law N(μ, diag(s²)) (X_0 in the paper's notation);
``w2_floor``  the same for the exact map f*(·, σ_max) from the same input;
``w2_excess`` w2 − w2_floor;
``w2_x1``   W2 to p_{σ_min} = N(μ, diag(s² + σ_min²)), the law the exact consistency map targets (X_1);
``w2_x1_floor`` the exact map's w2_x1 (0 up to rounding for the true input).
The error that slopes and N_ε are computed from (``err``) is w2_x1 for the true input and w2_excess for
the sampler input: in both cases the distance from what the exact consistency map achieves.

Modules: ``model`` (the closed-form maths), ``experiment`` (the tables), ``output`` (the files). Run:
``python -m cmbench.studies.theory OUT_DIR``.
"""
from __future__ import annotations

from pathlib import Path

from cmbench.studies.theory.experiment import (StudySettings, additivity_table, compute_theory_table,
                                               per_step_optimum, rate_tables, single_threaded_blas)
from cmbench.studies.theory.output import write_study

__all__ = ["StudySettings", "run_theory_study"]


def run_theory_study(out_dir: str | Path, settings: StudySettings = StudySettings()) -> list[Path]:
    """Run the study and write theory.csv, theory_slopes.csv, theory_summary.md, theory_summary.tex and
    (``settings.plot``) theory.png into out_dir, each atomically. Returns the written paths."""
    with single_threaded_blas():
        df = compute_theory_table(settings)
    per_d, per_series = rate_tables(df, settings.eps, settings.fit_min_n)
    return write_study(Path(out_dir), settings, df, per_d, per_series, additivity_table(df, settings),
                       per_step_optimum(df))
