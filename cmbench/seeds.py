"""Per-sample seeds and their noise (numpy only, so metrics can rebuild x_T without torch)."""
import numpy as np

from cmbench.config import RunConfig


def seed_noise(seeds: np.ndarray, shape: tuple, stream: int) -> np.ndarray:
    """Standard normal noise, one independent generator per (seed, stream): stream k feeds sampling step k, so
    a sample does not depend on batch size or device count (as NVlabs/edm generate.py)."""
    return np.stack([np.random.default_rng([int(s), stream]).standard_normal(shape) for s in seeds])


LABEL_STREAM = 2**32 - 1      # the stream of a seed's class label: no sampling step uses it


def seed_labels(seeds: np.ndarray, num_classes: int) -> np.ndarray:
    """One class label per sample seed, uniform over the classes (EDM's generate.py draws them per seed too):
    a conditional sample set is reproducible from its seeds alone."""
    return np.array([np.random.default_rng([int(s), LABEL_STREAM]).integers(num_classes) for s in seeds],
                    dtype=np.int64)


def sample_seeds(cfg: RunConfig) -> np.ndarray:
    return np.arange(cfg.sample.seed_start, cfg.sample.seed_start + cfg.sample.n, dtype=np.int64)


def initial_noise(cfg: RunConfig, nfe: int, seeds: np.ndarray | None = None) -> np.ndarray:
    """x_T = σ_0·z for the given sample seeds (default: all of the run's), in float32 as the network sees it."""
    seeds = sample_seeds(cfg) if seeds is None else seeds
    return (cfg.sigma_list(nfe)[0] * seed_noise(seeds, cfg.dataset.shape, 0)).astype(np.float32)
