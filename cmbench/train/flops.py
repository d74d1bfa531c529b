"""Training FLOPs per step: network evaluations per sample, as each loss makes them, × each network's FLOPs per
sample, counted once per network (torch.utils.flop_counter.FlopCounterMode on one sample; it counts matrix
products and convolutions, not element-wise work) × the global batch.

Per sample, in units of one forward pass (backward ≈ 2 × forward, so a forward with backward costs 3; a JVP
through torch.func.jvp costs about a forward with backward, 3: both approximations, stated here):
    edm                 the denoiser with backward (cmbench.losses.edm)                          student 3
    ct, ict             the model with backward, the target network at σ_i without (consistency)   student 3 + 1
    cd                  as ct, plus one teacher step: Heun 2 teacher evaluations, Euler 1 (cd)     student 4, teacher 2|1
    direct_cm           the model with backward, no student target; the teacher ODE from σ_{i+1}    student 3,
                        down to σ_min: i + 1 steps, E[i + 1] = N/2 for the uniform pair index      teacher N|N/2
    ect                 the model with backward, the target at r (whole batch) without (ect)       student 3 + 1
    sct                 the online pass with backward, the target's JVP (scm)                      student 3 + 3
    scd                 as sct, plus the teacher's velocity at x_t (one denoiser evaluation)       student 6, teacher 1
    meanflow            one JVP whose primal u keeps its graph, then the backward of u alone       student 3 + 2
    shortcut            the model with backward; two target passes on the bootstrap rows, 1/every    student 3 + 2/every
    imm                 f_{s,t} with backward, f_{s,r} without (imm)                                  student 3 + 1
    tcm                 as ect, plus the frozen stage-1 model at r (whole batch) (tcm)               student 4, teacher 1
The learned loss weighting of sCM (a tiny MLP of t) and the analytic teacher (numpy, no network) count 0."""
import copy

import torch
from torch.utils.flop_counter import FlopCounterMode


def _heun(cfg) -> int:
    return 2 if cfg.loss.get("solver", "heun") == "heun" else 1


# loss name → (student forward passes, teacher evaluations) per sample, as the module docstring counts them
EVALS = {"edm": lambda cfg: (3, 0), "ct": lambda cfg: (4, 0), "ict": lambda cfg: (4, 0), "ect": lambda cfg: (4, 0),
         "cd": lambda cfg: (4, _heun(cfg)),
         "direct_cm": lambda cfg: (3, _heun(cfg) * cfg.loss.get("n", 18) / 2),
         "sct": lambda cfg: (6, 0), "scd": lambda cfg: (6, 1), "meanflow": lambda cfg: (5, 0),
         "shortcut": lambda cfg: (3 + 2 / cfg.loss.get("bootstrap_every", 8), 0), "imm": lambda cfg: (4, 0),
         "tcm": lambda cfg: (4, 1)}


@torch.no_grad()
def forward_flops(net, cfg, device) -> int:
    """FLOPs of one forward pass of `net(x, σ, labels)` on one sample (0 for a callable without torch work)."""
    x = torch.zeros(1, *cfg.dataset.shape, device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device) if cfg.dataset.conditional else None
    with FlopCounterMode(display=False) as counter:
        net(x, torch.ones(1, device=device), labels)
    return counter.get_total_flops()


def flops_per_step(cfg, model, teacher, device) -> float | None:
    """Estimated training FLOPs of one step of the global batch; None for a loss EVALS does not know. The model
    is copied (eval mode: no dropout draws, so training's random streams are untouched)."""
    evals = EVALS.get(cfg.loss["name"])
    if evals is None:
        return None
    student, teacher_evals = evals(cfg)
    per_sample = student * forward_flops(copy.deepcopy(model).eval(), cfg, device)
    if teacher_evals:
        per_sample += teacher_evals * forward_flops(teacher.denoise, cfg, device)
    return float(per_sample * cfg.train.batch)
