"""gpu_ddpmpp: DDPM++ CIFAR-10 (55.7M) iCT training and 1-step sampling throughput, where CUDA exists. No
target: a record of images/s."""
import copy
import time

from benchmarks.common import resolve


def _time_training(cfg, model, g, batch: int, warm: int, steps: int) -> float:
    """Seconds of `steps` iCT steps (loss, RAdam, EMA) on one fixed random batch, after `warm` untimed ones."""
    import torch

    from cmbench import losses
    from cmbench.train.loop import build_optimizer
    ema = copy.deepcopy(model).requires_grad_(False)
    loss_fn = losses.build(cfg, model=model)
    opt = build_optimizer(cfg, model.parameters())
    x0 = torch.rand(batch, 3, 32, 32, device=g.device, generator=g) * 2 - 1
    ema_p, model_p = list(ema.parameters()), list(model.parameters())

    def step(k):
        opt.zero_grad(set_to_none=True)
        loss_fn(model, model, x0, k, g).mean().backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_p, model_p, 1 - cfg.train.ema_decay)

    for k in range(warm):
        step(k)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(steps):
        step(warm + k)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_sampling(cfg, model, g, batch: int, reps: int) -> float:
    """Seconds of `reps` 1-step samples (one network call at σ_max) of `batch` images, after 2 untimed ones."""
    import torch
    p = cfg.precond
    z = torch.randn(batch, 3, 32, 32, device=g.device, generator=g)
    sigma = torch.tensor(p.sigma_max, device=g.device)
    with torch.no_grad():
        for _ in range(2):
            model(z * p.sigma_max, sigma)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            model(z * p.sigma_max, sigma)
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_gpu(sizes: dict, configs) -> dict:
    import torch
    base = {"benchmark": "gpu_ddpmpp", "repeats": 1,
            "title": "DDPM++ CIFAR-10 (55.7M) iCT training and 1-step sampling images/s, batch 128",
            "ratio": None, "target": None}
    if not torch.cuda.is_available():
        return {**base, "skipped": "no GPU (torch.cuda.is_available() is False)", "met": None,
                "measured": "skipped: no GPU", "timings": {}}
    from cmbench import devices
    from cmbench.config import UNetNet
    from cmbench.nets.precond import Precond
    from cmbench.nets.unet import build_unet
    cfg = resolve(configs, "bench", "patches", "ict", {"optim": {"name": "radam", "lr": 1.0e-4}})   # CIFAR shape
    p = cfg.precond
    model = Precond(build_unet(UNetNet(name="unet"), (3, 32, 32)), p.sigma_data, p.sigma_min, boundary=True)
    dev = devices.device()
    model = model.to(dev).train()
    g = torch.Generator(dev).manual_seed(0)
    batch, (warm, steps) = 128, sizes["gpu_steps"]
    train_s = _time_training(cfg, model, g, batch, warm, steps)
    model.eval()
    sample_batch, sample_reps = 512, max(steps // 4, 2)
    sample_s = _time_sampling(cfg, model, g, sample_batch, sample_reps)
    train_ips, sample_ips = batch * steps / train_s, sample_batch * sample_reps / sample_s
    return {**base, "device": torch.cuda.get_device_name(), "params": sum(q.numel() for q in model.parameters()),
            "timings": {"train_s": train_s, "train_steps": steps, "warmup_steps": warm, "sample_s": sample_s,
                        "sample_batches": sample_reps, "sample_batch": sample_batch},
            "train_images_per_s": train_ips, "sample_images_per_s": sample_ips, "met": None,
            "measured": f"train {train_ips:.0f} img/s, 1-step sampling {sample_ips:.0f} img/s",
            "notes": "fp32, random images in [-1, 1] (throughput does not depend on the data); no target in "
                     "issue #7."}
