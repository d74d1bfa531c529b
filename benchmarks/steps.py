"""harness_step_{mlp,unet} and sct_vs_ict_{mlp,unet}: the harness's training step against a bare PyTorch loop
of the same computation, and its sCT step against its iCT step, from one interleaved sequence of runs."""
import copy
import tempfile
import time
from pathlib import Path

from benchmarks.common import TARGETS, interleave, median, resolve

NETS = {  # key: (suite, dataset, what)
    "mlp": ("toy", "ring2d", "toy MLP (ring2d, batch 512)"),
    "unet": ("digits", "digits", "digits U-Net (8×8, batch 64)"),
}


def harness_run(cfg, k: int) -> dict:
    """Train cfg with cmbench.train.loop.train in a fresh run dir; the times of steps k..steps and of each
    checkpoint save (write and prune), from the loop's on_step and on_save hooks."""
    from cmbench import checkpoint
    from cmbench.train import loop
    stamps, saves = [], []
    with tempfile.TemporaryDirectory(prefix="cmbench-bench-") as d:
        final = loop.train(cfg, Path(d) / "run", progress=False,
                           on_step=lambda step: stamps.append(time.perf_counter()),
                           on_save=lambda step, seconds: saves.append((step, seconds)))
        weights = checkpoint.load(final)["model"]
    n = cfg.train.steps
    assert len(stamps) == n + 1, (len(stamps), n)
    # the save of checkpoint `step` ends step - 1: inside the window when step - 1 >= k
    return {"window_s": stamps[n] - stamps[k], "steps": n - k,
            "saves_in_window_s": [s for step, s in saves if step > k],
            "save_s": [s for _, s in saves], "weights": weights}


def bare_run(cfg, k: int) -> dict:
    """What a researcher writes by hand for the same step: the same network (build_model), loss object
    (losses.build), data sampler, optimizer and EMA update; no checkpoints, stats, NaN guards or Draws."""
    import torch

    from cmbench import losses
    from cmbench.data import make_data
    from cmbench.nets import build_model
    t = cfg.train
    torch.set_num_threads(t.threads)
    data = make_data(cfg.dataset)
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg).train()
    loss_fn = losses.build(cfg, model=model)
    ema = copy.deepcopy(model).requires_grad_(False)
    target = copy.deepcopy(model).requires_grad_(False) if loss_fn.target_ema(0) is not None else None
    params = list(model.parameters()) + (list(loss_fn.module.parameters()) if loss_fn.module is not None else [])
    o = cfg.optim
    opt = {"adam": torch.optim.Adam, "radam": torch.optim.RAdam}[o.name](params, lr=o.lr, betas=tuple(o.betas),
                                                                           eps=o.eps)
    g = torch.Generator().manual_seed(cfg.run.seed)
    stamps = []
    for step in range(t.steps):
        stamps.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        x0 = data.sample_torch(t.batch, g)
        loss = loss_fn(model, target if target is not None else model, x0, step, g).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - t.ema_decay)
            if target is not None:
                mu = loss_fn.target_ema(step)
                for e, p in zip(target.parameters(), model.parameters()):
                    e.lerp_(p, 1 - mu)
    stamps.append(time.perf_counter())
    return {"window_s": stamps[-1] - stamps[k], "steps": t.steps - k, "weights": model.state_dict()}


def per_step(run: dict, saves: list[float] | None, checkpoint_every: int) -> float:
    """Window time per step with the in-window saves replaced by the median save charged once per
    checkpoint_every steps (the same thing when the window spans whole checkpoint periods)."""
    return (run["window_s"] - sum(run.get("saves_in_window_s", []))) / run["steps"] + (
        median(saves) / checkpoint_every if saves is not None else 0.0)


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[key].float() - b[key].float()).abs().max()) if a[key].numel() else 0.0 for key in a)


def bench_steps(net: str, sizes: dict, configs, want: set) -> list[dict]:
    """Benchmarks harness and sct (those in `want`) for one network, from one interleaved sequence of runs."""
    import torch
    suite, dataset, what = NETS[net]
    k, w = sizes[net]
    variants = ["ict"] + (["sct"] if "sct" in want else [])

    def config(variant: str, **train):
        overrides = {"train": train}
        if (net, variant) == ("unet", "sct"):
            # sCT on images starts from the suite's trained EDM teacher; its step costs the same from scratch,
            # which needs no teacher run
            overrides.update(teacher=None, precond={"trigflow_net": "trigflow"})
        return resolve(configs, suite, dataset, variant, overrides)

    cfgs = {v: config(v, steps=k + w) for v in variants}
    threads = torch.get_num_threads()
    # untimed warm-up, which also times checkpoint saves of each variant (a save every step)
    warmup_saves = {v: harness_run(config(v, steps=4, checkpoint_every=1), 0)["save_s"] for v in variants}
    if "harness" in want:
        bare_run(config("ict", steps=min(k + w, 20)), 0)
    jobs = [("harness_ict", lambda: harness_run(cfgs["ict"], k))]
    if "harness" in want:
        jobs.append(("bare_ict", lambda: bare_run(cfgs["ict"], k)))
    if "sct" in want:
        jobs.append(("harness_sct", lambda: harness_run(cfgs["sct"], k)))
    repeats = sizes["net_repeats"].get(net, sizes["repeats"])
    runs = interleave(repeats, jobs)
    torch.set_num_threads(threads)

    saves = {v: [s for r in runs["harness_" + v] for s in r["save_s"]] + warmup_saves[v] for v in variants}
    ict = cfgs["ict"].train
    common = {"repeats": repeats, "network": what, "suite": suite, "dataset": dataset,
              "window": {"warmup_steps": k, "timed_steps": w},
              "checkpoint_every": ict.checkpoint_every, "log_every": ict.log_every, "train_threads": ict.threads,
              "batch": ict.batch}
    h_ict = [per_step(r, saves["ict"], ict.checkpoint_every) for r in runs["harness_ict"]]
    out = []
    if "harness" in want:
        out.append(harness_record(net, common, runs, h_ict, saves["ict"]))
    if "sct" in want:
        out.append(sct_record(net, common, [per_step(r, saves["sct"], ict.checkpoint_every)
                                            for r in runs["harness_sct"]], h_ict))
    return out


def harness_record(net: str, common: dict, runs: dict, h_ict: list[float], saves: list[float]) -> dict:
    """harness_step_{net}: harness iCT step vs the bare loop's."""
    k, w = common["window"]["warmup_steps"], common["window"]["timed_steps"]
    ce, le = common["checkpoint_every"], common["log_every"]
    b_ict = [per_step(r, None, ce) for r in runs["bare_ict"]]
    diff = max(_max_abs_diff(h["weights"], b["weights"]) for h, b in zip(runs["harness_ict"], runs["bare_ict"]))
    ratio = median(h_ict) / median(b_ict)
    return {
        "benchmark": f"harness_step_{net}",
        "title": f"harness training step vs bare PyTorch loop, {common['network']}, iCT",
        **common,
        "baseline": "bare loop: same build_model network, losses.build loss object, data sampler, optimizer, "
                    "per-parameter EMA lerp; no checkpoints, stats, NaN guards, Draws",
        "timings": {"harness_s_per_step": h_ict, "bare_s_per_step": b_ict,
                    "harness_window_s": [r["window_s"] for r in runs["harness_ict"]],
                    "harness_saves_in_window_s": [r["saves_in_window_s"] for r in runs["harness_ict"]],
                    "bare_window_s": [r["window_s"] for r in runs["bare_ict"]],
                    "checkpoint_save_s": saves,
                    "pair_ratios": [a / b for a, b in zip(h_ict, b_ict)]},
        "harness_ms_per_step": 1e3 * median(h_ict), "bare_ms_per_step": 1e3 * median(b_ict),
        "checkpoint_ms_per_step": 1e3 * median(saves) / ce,
        "final_weights_max_abs_diff": diff,
        "ratio": ratio, "target": {"op": "<=", "value": TARGETS["harness"]},
        "met": ratio <= TARGETS["harness"],
        "measured": f"{1e3 * median(h_ict):.3g} vs {1e3 * median(b_ict):.3g} ms/step",
        "notes": f"steady state: steps {k}..{k + w} of a {k + w}-step run, harness at checkpoint_every {ce}, "
                 f"log_every {le}; final weights of the two loops differ by at most {diff:.3g} "
                 f"(0: the same computation).",
    }


def sct_record(net: str, common: dict, s: list[float], h_ict: list[float]) -> dict:
    """sct_vs_ict_{net}: harness sCT step vs harness iCT step."""
    k, w = common["window"]["warmup_steps"], common["window"]["timed_steps"]
    ratio = median(s) / median(h_ict)
    return {
        "benchmark": f"sct_vs_ict_{net}",
        "title": f"sCT step vs iCT step, {common['network']}, both through the harness",
        **common,
        "baseline": "harness iCT step on the same network (sCT: TrigFlow wrapper, forward-mode JVP via "
                    "torch.func, adaptive weighting module)",
        "timings": {"sct_s_per_step": s, "ict_s_per_step": h_ict,
                    "pair_ratios": [a / b for a, b in zip(s, h_ict)]},
        "sct_ms_per_step": 1e3 * median(s), "ict_ms_per_step": 1e3 * median(h_ict),
        "ratio": ratio, "target": {"op": "<=", "value": TARGETS["sct"]}, "met": ratio <= TARGETS["sct"],
        "measured": f"{1e3 * median(s):.3g} vs {1e3 * median(h_ict):.3g} ms/step",
        "notes": f"harness per-step times, steps {k}..{k + w}, checkpoint saves charged per checkpoint_every.",
    }
