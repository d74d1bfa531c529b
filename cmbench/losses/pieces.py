"""Building blocks shared by the consistency losses: noise grid, curricula, pairing, distance, weighting.
Each method in papers.md §9 is a choice among these pieces, not a copy of a loop."""
import math
from typing import Literal

import torch

from cmbench import grids


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """The Karras grid (cmbench.grids) as an ascending float64 tensor."""
    return torch.tensor(grids.karras_sigmas(n, sigma_min, sigma_max, rho), dtype=torch.float64)


# --- shared dropout masks ----------------------------------------------------------------------------------

def same_dropout(device: torch.device):
    """Context for the online pass: on exit the global RNG that dropout draws from (the CPU one, or the CUDA one
    of `device`) is rewound, so the target pass that follows draws the same masks and f_θ⁻ = f_θ at θ⁻ = θ.
    The CM code restores the RNG state before its target pass (papers.md §2.2), ECT its CUDA RNG state ("shared
    dropout mask", §4.2), and iCT synchronises the dropout RNGs of student and teacher."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# --- discretisation curricula N(k) and target EMA μ(k) ------------------------------------------------

def ct_discretization(k: int, total: int, s0: int, s1: int) -> int:
    """Song et al. 2023, App. C: N(k) = ceil(sqrt(k/K·((s1 + 1)² − s0²) + s0²) − 1) + 1."""
    return math.ceil(math.sqrt(k / total * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_target_ema(k: int, total: int, s0: int, s1: int, mu0: float, rule: str) -> float:
    """Song et al. 2023, App. C: μ(k) = exp(s0·ln μ0 / N(k)). The released code (openai/consistency_models and
    consistency_models_cifar10) divides by N(k) − 1 instead, giving μ0² at k = 0 (papers.md §2.3, §9.1)."""
    n = ct_discretization(k, total, s0, s1)
    return math.exp(s0 * math.log(mu0) / (n if rule == "paper" else n - 1))


def ict_discretization(k: int, total: int, s0: int, s1: int) -> int:
    """Song & Dhariwal 2023 (iCT), exponential curriculum: N(k) = min(s0·2^floor(k/K'), s1) + 1 with
    K' = floor(K / (log2 floor(s1/s0) + 1)) (papers.md §3.1 item 5)."""
    k_prime = max(math.floor(total / (math.log2(math.floor(s1 / s0)) + 1)), 1)   # ≥ 1: runs shorter than the stages
    return min(s0 * 2 ** (k // k_prime), s1) + 1


# --- pairing: which adjacent pair (σ_i, σ_{i+1}) of the grid a sample uses ------------------------------

def uniform_pair_probs(sigmas: torch.Tensor) -> torch.Tensor:
    """CM paper Alg. 3: i ~ U{1, ..., N−1}."""
    return torch.full((len(sigmas) - 1,), 1.0 / (len(sigmas) - 1), dtype=torch.float64)


def lognormal_pair_probs(sigmas: torch.Tensor, p_mean: float, p_std: float) -> torch.Tensor:
    """iCT §3.1 item 4: p(i) ∝ erf((ln σ_{i+1} − P_mean)/(√2 P_std)) − erf((ln σ_i − P_mean)/(√2 P_std))."""
    cdf = torch.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    p = cdf[1:] - cdf[:-1]
    return p / p.sum()


# --- distances d(a, b), one value per sample ------------------------------------------------------------

def _flat(a: torch.Tensor) -> torch.Tensor:
    return a.reshape(a.shape[0], -1)


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared ℓ2, averaged over data dimensions as in the CM code (papers.md §2.2)."""
    return _flat(a - b).square().mean(dim=1)


def l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _flat(a - b).abs().mean(dim=1)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float) -> torch.Tensor:
    """iCT: d(a, b) = sqrt(||a − b||² + c²) − c. Tends to ||a − b||²/(2c) as the residual → 0, to ℓ2 norm when large.

    c = 0 is ECT's sqrt(Δ) (CIFAR-10), whose derivative is 0/0 where a and b agree to the last bit: the gradient
    is zero there (ECT's training loop zeroes NaN gradients, EDM's nan_to_num; here only that sample's share is
    zeroed, not the whole parameter gradient it would have reached), so the run goes on."""
    sq = _flat(a - b).square().sum(dim=1)
    if c == 0:
        nonzero = sq > 0
        return torch.where(nonzero, sq, torch.ones_like(sq)).sqrt() * nonzero
    return (sq + c * c).sqrt() - c


DISTANCES = ("l2", "l1", "pseudo_huber")
Distance = Literal[DISTANCES]


def distance(name: str, c: float):
    """d(a, b) by name; c is the Pseudo-Huber constant."""
    return {"l2": l2, "l1": l1, "pseudo_huber": lambda a, b: pseudo_huber(a, b, c)}[name]


def ict_huber_c(dim: int) -> float:
    """iCT: c = 0.00054·sqrt(D), D = data dimensionality (papers.md §3.1 item 2)."""
    return 0.00054 * math.sqrt(dim)


# --- weighting λ(σ_i, σ_{i+1}) -------------------------------------------------------------------------

def uniform_weight(sig_lo: torch.Tensor, sig_hi: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(sig_lo)


def inv_delta_weight(sig_lo: torch.Tensor, sig_hi: torch.Tensor) -> torch.Tensor:
    """iCT: λ(σ_i) = 1 / (σ_{i+1} − σ_i)."""
    return 1 / (sig_hi - sig_lo)


WEIGHTINGS = {"uniform": uniform_weight, "inv_delta": inv_delta_weight}
Weighting = Literal[tuple(WEIGHTINGS)]


# --- the model a flow-map loss trains --------------------------------------------------------------------------

def require_flowmap(cfg, path: str, output: str, what: str) -> None:
    """ValueError unless the run's model is the flow map `what` needs: precond 'flowmap' on `path` in form `output`."""
    fm = cfg.precond.flowmap
    if cfg.precond.name != "flowmap" or fm.path != path or fm.output != output:
        raise ValueError(f"trains {what}: needs precond 'flowmap' with flowmap.path {path!r} and flowmap.output "
                         f"{output!r}")
