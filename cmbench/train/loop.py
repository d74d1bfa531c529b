"""The one training loop. Every variant runs through it; a variant only picks a registered loss and knobs."""
import contextlib
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from cmbench import checkpoint, devices, io, losses, paths
from cmbench.config import ConfigError, RunConfig, write_run_config
from cmbench.data import make_data
from cmbench.errors import DamagedFile, TrainingDiverged
from cmbench.nets import build_model
from cmbench.status import ProgressLine
from cmbench.teacher import build_teacher
from cmbench.draws import Draws
from cmbench.train import distributed
from cmbench.train.flops import flops_per_step


# train.precision → autocast dtype; the network's matrix products and convolutions run in it, while the parameters,
# optimizer, EMA and the loss arithmetic on the denoiser's output (c_skip·x + c_out·F promotes F back to fp32: sCM's
# tangent normalisation, ECT/iCT distances) stay fp32, as autocast leaves element-wise ops in their inputs' dtype
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_BACKEND = "inductor"    # tests on CPU swap in "aot_eager" (traced by dynamo/AOTAutograd, no C++ build)


class LossScale:
    """fp16's dynamic loss scale, with torch.amp.GradScaler's schedule (start 2¹⁶, halve on overflow, double after
    2000 good steps in a row): the loss is multiplied by `scale` before backward and the gradients divided by it
    (powers of two: exact) before the update. A step whose loss or gradients are not finite is skipped, as ECT's
    fp16 training does (UNVERIFIED against its code); the run diverged only when the scale falls below 1."""

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000):
        self.scale, self.growth_interval, self.good, self.skipped = scale, growth_interval, 0, 0

    def update(self, finite: bool) -> None:
        if finite:
            self.good += 1
            if self.good == self.growth_interval:
                self.scale, self.good = self.scale * 2, 0
        else:
            self.scale, self.good, self.skipped = self.scale / 2, 0, self.skipped + 1

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good": self.good, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good, self.skipped = state["scale"], state["good"], state["skipped"]

    def stats(self) -> dict:
        return {"loss_scale": self.scale, "skipped_steps": self.skipped}


def build_optimizer(cfg: RunConfig, params):
    o = cfg.optim
    cls = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam, "adamw": torch.optim.AdamW}[o.name]
    return cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)


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


def truncate_stats(path: Path, start_step: int) -> None:
    """As training (re)starts, keep only the stats lines of the steps the checkpoint covers (the rest are
    redone) and drop a line torn by a crash mid-write; the file is replaced atomically."""
    if not path.exists():
        return
    records, torn = io.read_jsonl(path)
    if torn:
        print(f"cmbench: {path}: dropped {torn} torn line(s)", file=sys.stderr)
    keep = [r for r in records if isinstance(r.get("step"), int) and r["step"] < start_step]
    io.write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def micro_batches(batch: int, per_device: int | None, rank: int, world: int) -> list[slice]:
    """This rank's slices of the global batch: an equal share, cut into micro-batches of `per_device`."""
    share = batch // world
    if batch % world or (per_device and share % per_device):
        parts = f" × micro-batches of train.batch_per_device {per_device}" if per_device else " (equal shares)"
        raise ConfigError(f"train.batch {batch} does not split into {world} rank(s){parts}")
    per_device = per_device or share
    return [slice(lo, lo + per_device) for lo in range(rank * share, (rank + 1) * share, per_device)]


@dataclass
class Trainer:
    """Everything a training step touches, built once per run: the model, its sampling EMA, the target network
    θ⁻ (when the loss keeps one), the loss (with its learned parts), the optimizer and the data/noise stream."""
    cfg: RunConfig
    rdir: Path
    dev: torch.device
    data: object
    model: torch.nn.Module
    ema: torch.nn.Module
    target: torch.nn.Module | None
    loss_fn: object
    params: list
    opt: torch.optim.Optimizer
    generator: torch.Generator   # the data and noise stream, on the training device: its state is the data cursor
    gamma: float | None          # EDM2 power-EMA exponent, or None for a constant ema_decay
    scaler: LossScale | None     # train.precision fp16 only

    @classmethod
    def build(cls, cfg: RunConfig, rdir: Path, dev: torch.device) -> "Trainer":
        teacher = build_teacher(cfg, rdir, dev)
        data = make_data(cfg.dataset)
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg).to(dev).train()
        loss_fn = losses.build(cfg, teacher, model)
        if cfg.train.init_from is not None:
            model.load_state_dict(checkpoint.load(cfg.train.init_from)["ema"])
        elif cfg.teacher is not None and cfg.teacher.init_student:
            model.load_state_dict(teacher.state)     # same network, other preconditioning (CM code copies it so)
        ema = copy.deepcopy(model).requires_grad_(False)
        target = copy.deepcopy(model).requires_grad_(False) if loss_fn.target_ema(0) is not None else None
        if loss_fn.module is not None:
            loss_fn.module.to(dev)
        params = list(model.parameters()) + (list(loss_fn.module.parameters()) if loss_fn.module is not None else [])
        t = cfg.train
        if t.compile:      # in place, after the copies: state_dict keys and the EMA stay those of the plain module
            for net in (model, target):
                if net is not None:
                    net.compile(backend=COMPILE_BACKEND)
        return cls(cfg, rdir, dev, data, model, ema, target, loss_fn, params,
                   build_optimizer(cfg, params), torch.Generator(dev).manual_seed(cfg.run.seed),
                   power_ema_gamma(t.ema_sigma_rel) if t.ema_sigma_rel is not None else None,
                   LossScale() if t.precision == "fp16" else None)

    def autocast(self):
        p = self.cfg.train.precision
        return contextlib.nullcontext() if p == "fp32" else torch.autocast(self.dev.type, AUTOCAST[p])

    def state_dict(self, step: int) -> dict:
        ck = {"step": step, "config_hash": self.cfg.hash, "model": self.model.state_dict(),
              "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(), **rng_state(self.generator)}
        if self.target is not None:
            ck["target"] = self.target.state_dict()
        if self.loss_fn.module is not None:
            ck["loss_module"] = self.loss_fn.module.state_dict()
        if self.scaler is not None:
            ck["loss_scale"] = self.scaler.state_dict()
        return ck

    def load_state_dict(self, state: dict) -> int:
        """Restore a checkpoint; returns its step."""
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])
        if self.loss_fn.module is not None:
            self.loss_fn.module.load_state_dict(state["loss_module"])
        self.opt.load_state_dict(state["optimizer"])
        if self.scaler is not None:
            self.scaler.load_state_dict(state["loss_scale"])
        set_rng_state(state, self.generator)
        return state["step"]

    def gradients(self, step: int, parts: list[slice], world: int) -> torch.Tensor:
        """Accumulate this rank's micro-batches of the global batch and sum gradients over ranks; returns the
        global batch's mean loss. Every micro-batch rewinds the stream, so Draws hands out the same numbers
        whatever the split."""
        t = self.cfg.train
        self.opt.zero_grad(set_to_none=True)
        loss, at_step = torch.zeros((), device=self.dev), self.generator.get_state()
        for part in parts:
            self.generator.set_state(at_step)
            draws = Draws(self.generator, t.batch, part)
            x0, labels = self.data.sample_batch(t.batch, self.generator)
            x0, labels = x0[part], None if labels is None else labels[part]
            target = self.target if self.target is not None else self.model
            with self.autocast():
                micro = self.loss_fn(self.model, target, x0, step, draws, labels).float().sum() / t.batch
            (micro if self.scaler is None else micro * self.scaler.scale).backward()
            loss += micro.detach()
        distributed.all_sum([loss] + [p.grad for p in self.params if p.grad is not None], world)
        return loss

    def step(self, step: int, parts: list[slice], world: int) -> tuple[float | None, float]:
        """One optimisation step; returns (loss, gradient norm), loss None for an fp16 step skipped on overflow
        (LossScale). A non-finite loss or gradient norm otherwise stops the run before the update
        (TrainingDiverged), so the newest checkpoint stays good."""
        # the guards read Python floats (loss.item() is logged anyway); get_total_norm is the value
        # clip_grad_norm_(params, inf) returns, without its multiplication of every gradient by 1.0
        loss = self.gradients(step, parts, world).item()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.scaler is not None:
            torch._foreach_div_(grads, self.scaler.scale)
            grad_norm = torch.nn.utils.get_total_norm(grads).item()
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            self.scaler.update(finite)
            if not finite:
                if self.scaler.scale < 1:
                    self.guard(step, "loss or gradient norm (fp16 loss scale fell below 1)", math.nan)
                return None, grad_norm
        self.guard(step, "loss", loss)
        grad_norm = torch.nn.utils.get_total_norm(grads).item() if self.scaler is None else grad_norm
        self.guard(step, "gradient norm", grad_norm)
        self.opt.step()
        self.update_averages(step)
        return loss, grad_norm

    def guard(self, step: int, what: str, value: float) -> None:
        if not math.isfinite(value):
            good = checkpoint.list_checkpoints(paths.checkpoints_dir(self.rdir))
            raise TrainingDiverged(f"{self.cfg.run.variant} ({self.rdir}): step {step}: non-finite {what} "
                                   f"({value}); last good checkpoint: {good[-1] if good else 'none'}")

    @torch.no_grad()
    def update_averages(self, step: int) -> None:
        """The sampling EMA and, when the loss keeps one, the target network θ⁻ ← μ(k)θ⁻ + (1 − μ(k))θ."""
        beta = ema_beta(self.cfg.train, step, self.gamma)
        for e, p in zip(self.ema.parameters(), self.model.parameters()):
            e.lerp_(p, 1 - beta)
        if self.target is not None:
            mu = self.loss_fn.target_ema(step)
            for e, p in zip(self.target.parameters(), self.model.parameters()):
                e.lerp_(p, 1 - mu)


def train(cfg: RunConfig, rdir: Path, progress: bool = True, on_step: Callable[[int], None] | None = None,
          on_save: Callable[[int, float], None] | None = None) -> Path:
    """Train until cfg.train.steps, resuming from the newest valid checkpoint; returns the final weights file.
    Idempotent: returns at once when the final file of this config exists. On several ranks (WORLD_SIZE > 1)
    each computes its shard of the global batch, gradients are summed, and only rank 0 writes.
    on_step(k) is called as step k starts (and with k = steps after the last), on_save(k, seconds) after each
    checkpoint write: how benchmarks time the loop from outside. When on_step(k) returns True, the state after
    k steps is checkpointed before step k runs (a preemption: cmbench.launch).
    Rank 0 holds the run dir's lock throughout (checkpoint.run_lock): a second trainer, or a sampler, of the
    same run dir stops with one line instead of interleaving with this one."""
    rdir = Path(rdir)
    rank, world = distributed.setup()
    with checkpoint.run_lock(rdir) if rank == 0 else contextlib.nullcontext():
        return _train(cfg, rdir, rank, world, progress, on_step, on_save)


def finished(cfg: RunConfig, rdir: Path, main: bool) -> bool:
    """Whether final weights of this config exist and pass their check. Rank 0 sets damaged ones aside (one
    line on stderr), so that training redoes them from the checkpoints."""
    try:
        return checkpoint.load_final(rdir, set_aside=main)["config_hash"] == cfg.hash
    except FileNotFoundError:
        return False
    except DamagedFile as e:
        if main:
            print(f"cmbench: {e}", file=sys.stderr)
        return False


def _train(cfg: RunConfig, rdir: Path, rank: int, world: int, progress: bool,
           on_step: Callable[[int], None] | None, on_save: Callable[[int, float], None] | None) -> Path:
    final = paths.final_weights(rdir)
    main = rank == 0
    ckdir = paths.checkpoints_dir(rdir)
    if finished(cfg, rdir, main) and not checkpoint.missing_snapshots(rdir, cfg.evaluated_steps()):
        return final
    if main:
        write_run_config(cfg, rdir)      # planning wrote it; a run started from Python writes it here
        checkpoint.set_aside_other_config(rdir, cfg.hash)
        ckdir.mkdir(exist_ok=True)
    distributed.barrier(world)
    t = cfg.train
    torch.set_num_threads(t.threads)
    dev = devices.device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    tr = Trainer.build(cfg, rdir, dev)
    flops = flops_per_step(cfg, tr.model, tr.loss_fn.teacher, dev)
    start, window, seconds = resume(tr, ckdir, main, checkpoint.missing_snapshots(rdir, cfg.evaluated_steps()))
    clock = time.perf_counter() - seconds     # training wall seconds count on across resumes
    snapshots = set(cfg.evaluated_steps())

    def budget(done: int) -> dict:
        """What the weights after `done` steps cost, saved in checkpoints and snapshots (not in final.pt, whose
        bytes depend on the weights alone: the checkpoint of the last step holds its figures) for the records."""
        return {"images": done * t.batch, "train_seconds": time.perf_counter() - clock,
                "train_flops": None if flops is None else done * flops}
    stats_path = paths.stats_file(rdir)
    if main:
        truncate_stats(stats_path, start)
    log = StatsLog(stats_path if main else None, window)
    bar = tqdm(range(start, t.steps), initial=start, total=t.steps, disable=None if progress and main else True,
               desc=f"{cfg.run.variant}/{cfg.run.dataset}/s{cfg.run.seed}", mininterval=2, leave=False)
    # a log with no terminal (tqdm turned its bar off) gets a line every train.progress_seconds instead
    line = ProgressLine(start, t.steps, t.progress_seconds) if bar.disable and progress and main else None
    parts = micro_batches(t.batch, t.batch_per_device, rank, world)

    def save(done: int) -> None:
        t0 = time.perf_counter()
        checkpoint.save_atomic({**tr.state_dict(done), "stats_window": log.window(), **budget(done)},
                               checkpoint.ckpt_path(ckdir, done))
        checkpoint.prune(ckdir, t.keep_checkpoints)
        if on_save is not None:
            on_save(done, time.perf_counter() - t0)

    with log:
        for step in bar:
            if on_step is not None and on_step(step) and main and step > start:
                save(step)
            loss, grad_norm = tr.step(step, parts, world)
            done = step + 1
            log.add(loss)
            if line is not None and loss is not None:
                line.add(done, loss)
            if done % t.log_every == 0 or done == t.steps:
                rec = log.write(step, grad_norm, lr=tr.opt.param_groups[0]["lr"], **tr.loss_fn.stats(step),
                                **(tr.scaler.stats() if tr.scaler is not None else {}))
                bar.set_postfix(loss="skipped" if rec["loss"] is None else f"{rec['loss']:.3g}")
            # the last step too: final.pt can then be rebuilt without training (Snakemake deletes a re-run job's outputs)
            if main and (done % t.checkpoint_every == 0 or done == t.steps):
                save(done)
            if main and done in snapshots:
                checkpoint.save_atomic({"step": done, "config_hash": cfg.hash, "ema": tr.ema.state_dict(),
                                        **budget(done)}, paths.weights_file(rdir, done))
    if on_step is not None:
        on_step(t.steps)
    distributed.barrier(world)
    if main:
        checkpoint.save_atomic({"step": t.steps, "config_hash": cfg.hash, "model": tr.model.state_dict(),
                                "ema": tr.ema.state_dict()}, final)
    return final


def resume(tr: Trainer, ckdir: Path, main: bool, missing: list[int]) -> tuple[int, tuple[float, int], float]:
    """Load the newest valid checkpoint of this config into tr, from before the first `missing` snapshot step
    (evaluate.every changed: training redoes the steps from there, bit-identically, and writes the snapshot as
    it passes); returns the step to start from (0: none), the stats window saved with it (StatsLog) and the
    training seconds so far."""
    state, path = checkpoint.load_latest_valid(ckdir, missing[0] - 1 if missing else None)
    if state is None:
        return 0, (0.0, 0), 0.0
    if state["config_hash"] != tr.cfg.hash:
        raise ConfigError(f"{path} was written by config {state['config_hash']}, not {tr.cfg.hash}")
    start = tr.load_state_dict(state)
    if main:
        print(f"cmbench: resuming {ckdir.parent} from {path.name} (step {start})", file=sys.stderr)
    # both absent in checkpoints of older versions
    return start, tuple(state.get("stats_window", (0.0, 0))), state.get("train_seconds", 0.0)


class StatsLog:
    """stats.jsonl: one line per `train.log_every` steps with the mean loss since the last line, the last
    gradient norm, the loss's own statistics and the time per thousand steps. None: another rank (no file).
    The window (loss sum and steps since the last line) is saved in each checkpoint and restored on resume, so
    a resumed run writes the same lines as an uninterrupted one even when a checkpoint falls between two."""

    def __init__(self, path: Path | None, window: tuple[float, int] = (0.0, 0)):
        self.path, self.file = path, None
        self.loss_sum, self.n = window
        self.timed, self.tick = 0, time.perf_counter()     # steps run by this process since the last line

    def __enter__(self):
        self.file = open(self.path if self.path is not None else os.devnull, "a")
        return self

    def __exit__(self, *exc):
        self.file.close()

    def add(self, loss: float | None) -> None:
        """None: an fp16 step skipped on overflow, timed but not in the mean."""
        self.timed += 1
        if loss is not None:
            self.loss_sum, self.n = self.loss_sum + loss, self.n + 1

    def window(self) -> tuple[float, int]:
        return self.loss_sum, self.n

    def write(self, step: int, grad_norm: float, **extra) -> dict:
        now = time.perf_counter()
        rec = {"step": step, "loss": self.loss_sum / self.n if self.n else None, "grad_norm": grad_norm, **extra,
               "sec_per_kstep": 1000 * (now - self.tick) / self.timed}
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        self.loss_sum, self.n, self.timed, self.tick = 0.0, 0, 0, now
        return rec
