"""The one training loop. Every variant runs through it; a variant only picks a registered loss and knobs."""
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cmbench import losses, paths
from cmbench.config import ConfigError, RunConfig
from cmbench.data import make_data
from cmbench.errors import TrainingDiverged
from cmbench.nets import build_model
from cmbench.teacher import build_teacher
from cmbench.draws import Draws
from cmbench.train import checkpoint, distributed


def build_optimizer(cfg: RunConfig, params):
    o = cfg.optim
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[o.name]
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def power_ema_gamma(sigma_rel: float) -> float:
    """γ of EDM2's power-function EMA with relative length σ_rel = sqrt((γ + 1)/((γ + 2)²(γ + 3))) (Karras et al.
    2024, Eq. 3): the largest real root of γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²)."""
    import numpy as np
    t = sigma_rel**-2
    return float(np.roots([1, 7, 16 - t, 12 - t]).real.max())


def ema_beta(t, step: int, gamma: float | None) -> float:
    """The sampling EMA's decay after 0-based step `step`: constant `train.ema_decay`, or EDM2's power function
    β = (1 − 1/(k + 1))^(γ + 1) with k + 1 the number of updates so far (EDM2 `power_function_beta` at
    t_next = (k + 1)·batch, t_delta = batch)."""
    return t.ema_decay if gamma is None else (step / (step + 1)) ** (gamma + 1)


def rng_state(generator: torch.Generator) -> dict:
    state = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def write_run_config(cfg: RunConfig, rdir: Path) -> None:
    """config.json describes the run. Checkpoints and stats of another config are never mixed with this one's
    nor deleted: they are set aside under names carrying their config hash."""
    path = rdir / "config.json"
    if path.exists():
        old = json.loads(path.read_text()).get("hash")
        if old != cfg.hash:
            for name in ("checkpoints", "stats.jsonl", "final.pt"):
                if (rdir / name).exists():
                    aside = rdir / f"{Path(name).stem}-{old}{Path(name).suffix}"
                    os.replace(rdir / name, aside)
                    print(f"cmbench: config changed ({old} → {cfg.hash}): kept {aside.name}", file=sys.stderr)
    rdir.mkdir(parents=True, exist_ok=True)
    tmp = rdir / ".config.json.tmp"
    tmp.write_text(json.dumps({"hash": cfg.hash, "config": cfg.to_dict()}, indent=2))
    os.replace(tmp, path)


def truncate_stats(path: Path, start_step: int) -> None:
    """After a resume, drop stats lines from steps the checkpoint does not cover (they will be redone)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] < start_step]
    path.write_text("".join(ln + "\n" for ln in keep))


def micro_batches(batch: int, per_device: int | None, rank: int, world: int) -> list[slice]:
    """This rank's slices of the global batch: an equal share, cut into micro-batches of `per_device`."""
    share = batch // world
    per_device = per_device or share
    if batch % world or share % per_device:
        raise ConfigError(f"train.batch {batch} does not split into {world} rank(s) × micro-batches of "
                          f"train.batch_per_device {per_device}")
    return [slice(lo, lo + per_device) for lo in range(rank * share, (rank + 1) * share, per_device)]


def train(cfg: RunConfig, rdir: Path, progress: bool = True) -> Path:
    """Train until cfg.train.steps, resuming from the newest valid checkpoint; returns the final weights file.
    Idempotent: returns at once when the final file of this config exists. On several ranks (WORLD_SIZE > 1)
    each computes its shard of the global batch, gradients are summed, and only rank 0 writes."""
    rdir = Path(rdir)
    final = paths.final_weights(rdir)
    if final.exists() and checkpoint.load(final)["config_hash"] == cfg.hash:
        return final
    rank, world = distributed.setup()
    main = rank == 0
    if main:
        write_run_config(cfg, rdir)
        (rdir / "checkpoints").mkdir(exist_ok=True)
    distributed.barrier(world)
    t = cfg.train
    torch.set_num_threads(t.threads)
    dev = distributed.device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    teacher = build_teacher(cfg, rdir, dev)
    data = make_data(cfg.dataset)

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg).to(dev).train()
    loss_fn = losses.build(cfg, teacher)
    if t.init_from is not None:
        model.load_state_dict(checkpoint.load(t.init_from)["ema"])
    elif cfg.teacher is not None and cfg.teacher.init_student:
        model.load_state_dict(teacher.state)     # same network, other preconditioning (CM code copies it so)
    ema = copy.deepcopy(model).requires_grad_(False)
    target = copy.deepcopy(model).requires_grad_(False) if loss_fn.target_ema(0) is not None else None
    if loss_fn.module is not None:
        loss_fn.module.to(dev)
    params = list(model.parameters()) + (list(loss_fn.module.parameters()) if loss_fn.module is not None else [])
    opt = build_optimizer(cfg, params)
    # the data and noise stream, on the training device: its state is the data cursor
    generator = torch.Generator(dev).manual_seed(cfg.run.seed)
    gamma = power_ema_gamma(t.ema_sigma_rel) if t.ema_sigma_rel is not None else None

    ckdir = rdir / "checkpoints"
    state, path = checkpoint.load_latest_valid(ckdir)
    start = 0
    if state is not None:
        if state["config_hash"] != cfg.hash:
            raise ConfigError(f"{path} was written by config {state['config_hash']}, not {cfg.hash}")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        if target is not None:
            target.load_state_dict(state["target"])
        if loss_fn.module is not None:
            loss_fn.module.load_state_dict(state["loss_module"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state, generator)
        start = state["step"]
        if main:
            print(f"cmbench: resuming {rdir} from {path.name} (step {start})", file=sys.stderr)
    stats_path = rdir / "stats.jsonl"
    if main:
        truncate_stats(stats_path, start)

    def save(step: int) -> Path:
        ck = {"step": step, "config_hash": cfg.hash, "model": model.state_dict(), "ema": ema.state_dict(),
              "optimizer": opt.state_dict(), **rng_state(generator)}
        if target is not None:
            ck["target"] = target.state_dict()
        if loss_fn.module is not None:
            ck["loss_module"] = loss_fn.module.state_dict()
        out = checkpoint.ckpt_path(ckdir, step)
        checkpoint.save_atomic(ck, out)
        checkpoint.prune(ckdir, t.keep_checkpoints)
        return out

    def diverged(step: int, what: str, value: torch.Tensor) -> TrainingDiverged:
        good = checkpoint.list_checkpoints(ckdir)
        return TrainingDiverged(f"{cfg.run.variant} ({rdir}): step {step}: non-finite {what} ({value.item()}); "
                                f"last good checkpoint: {good[-1] if good else 'none'}")

    loss_sum, n_acc, tick = 0.0, 0, time.perf_counter()
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, disable=None if progress and main else True,
               desc=f"{cfg.run.variant}/{cfg.run.dataset}/s{cfg.run.seed}", mininterval=2, leave=False)
    parts = micro_batches(t.batch, t.batch_per_device, rank, world)
    with open(stats_path if main else os.devnull, "a") as stats:
        for step in bar:
            opt.zero_grad(set_to_none=True)
            loss, at_step = torch.zeros((), device=dev), generator.get_state()
            for part in parts:          # this rank's micro-batches of the global batch (Draws: same numbers)
                generator.set_state(at_step)
                draws = Draws(generator, t.batch, part)
                x0, labels = data.sample_batch(t.batch, generator)
                x0, labels = x0[part], None if labels is None else labels[part]
                per_sample = loss_fn(model, target if target is not None else model, x0, step, draws, labels)
                micro = per_sample.sum() / t.batch
                micro.backward()
                loss += micro.detach()
            distributed.all_sum([loss] + [p.grad for p in params if p.grad is not None], world)
            # the guards read Python floats (loss.item() is logged anyway); get_total_norm is the value
            # clip_grad_norm_(params, inf) returns, without its multiplication of every gradient by 1.0
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise diverged(step, "loss", loss)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if not math.isfinite(grad_norm.item()):
                raise diverged(step, "gradient norm", grad_norm)
            opt.step()
            with torch.no_grad():
                beta = ema_beta(t, step, gamma)
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1 - beta)
                if target is not None:
                    mu = loss_fn.target_ema(step)
                    for e, p in zip(target.parameters(), model.parameters()):
                        e.lerp_(p, 1 - mu)
            loss_sum, n_acc = loss_sum + loss_value, n_acc + 1
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                now = time.perf_counter()
                rec = {"step": step, "loss": loss_sum / n_acc, "grad_norm": grad_norm.item(),
                       "lr": opt.param_groups[0]["lr"], **loss_fn.stats(step),
                       "sec_per_kstep": 1000 * (now - tick) / n_acc}
                stats.write(json.dumps(rec) + "\n")
                stats.flush()
                bar.set_postfix(loss=f"{rec['loss']:.3g}")
                loss_sum, n_acc, tick = 0.0, 0, now
            if main and done % t.checkpoint_every == 0 and done < t.steps:
                save(done)
    distributed.barrier(world)
    if not main:
        return final
    checkpoint.save_atomic({"step": t.steps, "config_hash": cfg.hash, "model": model.state_dict(),
                            "ema": ema.state_dict()}, final)
    return final
