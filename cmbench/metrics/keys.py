"""Metric keys and FID backends, defined once (module constants, as torch-fidelity's). Imports nothing: the
schema, the evaluation and the report all read them. The step count is never part of a key: it is a field."""

W2 = "w2"                        # Gaussian data: W2 of N(sample mean, sample cov) to the exact law
FD = "fd"                        # squared Fréchet distance in data (pixel) space to true data
SLICED_W2 = "sliced_w2"          # mixtures: sliced W2 to fresh true data
NEAR_MODE = "near_mode_fraction" # mixtures: share of samples within the 98.9% radius of a mode
MODE_COVERAGE_MIN = "mode_coverage_min"  # mixtures: worst mode's near-mode share relative to its weight
ODE_ERROR = "ode_error"          # mean ||sample − Φ(x_T)||², Φ = exact PF-ODE map from the initial noise
FID = "fid"                      # Fréchet Inception distance (cmbench.metrics.fid)

# the order of metrics in tables (FID first; keys other suites may add: fd_dinov2, fd_pixels)
ORDER = (FID, "fd_dinov2", "fd_pixels", W2, FD, SLICED_W2, NEAR_MODE, MODE_COVERAGE_MIN, ODE_ERROR)

# the metrics where higher is better (shares of samples near the modes); every other metric is a distance
HIGHER_IS_BETTER = (NEAR_MODE, MODE_COVERAGE_MIN)

# FID backends, each reading the same sample file: torch-fidelity, and clean-fid in its two modes
FID_SPECS = ("torch-fidelity", "clean-fid/legacy_tensorflow", "clean-fid/clean")
