"""Probability-flow ODE solvers in EDM σ-space (Karras et al. 2022): dx/dσ = (x − D(x, σ))/σ.

Shared by the teacher sampler (EDM Alg. 1, deterministic), the CD teacher step (Song et al. 2023, §2.2 of
papers.md) and the Direct CM target (the same steps, run down to σ_min). `denoise(x, sigma, labels)` takes a
per-sample σ of shape [B] and the class labels [B] of conditional data (else None)."""
import torch


def _col(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))


def euler_step(denoise, x: torch.Tensor, s_from: torch.Tensor, s_to: torch.Tensor, labels=None) -> torch.Tensor:
    d = (x - denoise(x, s_from, labels)) / _col(s_from, x)
    return x + _col(s_to - s_from, x) * d


def heun_step(denoise, x: torch.Tensor, s_from: torch.Tensor, s_to: torch.Tensor, labels=None) -> torch.Tensor:
    """EDM Alg. 1: Euler predictor, trapezoidal corrector; the corrector is skipped where σ_to = 0."""
    d = (x - denoise(x, s_from, labels)) / _col(s_from, x)
    x_euler = x + _col(s_to - s_from, x) * d
    last = s_to == 0
    if bool(last.all()):
        return x_euler
    s_safe = torch.where(last, torch.ones_like(s_to), s_to)
    d_next = (x_euler - denoise(x_euler, s_safe, labels)) / _col(s_safe, x)
    x_heun = x + _col(s_to - s_from, x) * (d + d_next) / 2
    return torch.where(_col(last, x).bool(), x_euler, x_heun)


STEPS = {"euler": euler_step, "heun": heun_step}


def solve_down(denoise, x: torch.Tensor, grid: torch.Tensor, start: torch.Tensor, stop: int, solver: str,
               labels: torch.Tensor | None = None):
    """Integrate each sample from grid[start_b] down to grid[stop] along the grid (ascending σ). The batch moves
    together from its largest start index downward; a sample joins when the solver reaches its own start
    (as the Direct CM code, papers.md §6.3)."""
    step = STEPS[solver]
    for j in range(int(start.max()), stop, -1):
        active = start >= j
        if not bool(active.any()):
            continue
        s_from = grid[j].expand(int(active.sum())).to(x.device)
        s_to = grid[j - 1].expand_as(s_from).to(x.device)
        x = x.clone()
        x[active] = step(denoise, x[active], s_from, s_to, None if labels is None else labels[active])
    return x


def sample_ode(denoise, x_t: torch.Tensor, sigmas: list[float], solver: str = "heun",
               labels: torch.Tensor | None = None) -> torch.Tensor:
    """Deterministic sampler over an explicit descending σ list with a final step to σ = 0 (EDM Alg. 1):
    NFE = 2·len(sigmas) − 1 with Heun."""
    grid = torch.tensor([0.0] + sorted(sigmas), dtype=torch.float64)
    start = torch.full((x_t.shape[0],), len(sigmas), dtype=torch.long)
    return solve_down(denoise, x_t, grid, start, 0, solver, labels)
