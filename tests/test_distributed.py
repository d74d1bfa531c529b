"""Two CPU ranks (gloo) and gradient accumulation reproduce the single-rank run at the same global batch."""
import json
import os
import socket

import torch
import torch.multiprocessing as mp

from cmbench import paths
from cmbench.config import Experiment
from cmbench import checkpoint
from cmbench.train import loop
from cmbench.checks import check_run
from conftest import REPO

OVERRIDES = {"train": {"steps": 300, "batch": 64, "log_every": 25, "checkpoint_every": 100}}


def config(per_device=None):
    # CT: a target network and an EMA, so every piece of replicated state is exercised
    over = {"train": {**OVERRIDES["train"], "batch_per_device": per_device}}
    return check_run(Experiment(REPO / "configs").resolve("toy", "ring2d", "ct", 0, over))


def rank_main(rank: int, world: int, port: int, results: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world)})
    torch.set_num_threads(1)
    cfg = config(per_device=16)          # 2 ranks × 2 micro-batches of 16 = the global batch of 64
    loop.train(cfg, paths.run_dir(results, cfg.run), progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_reproduce_the_single_rank_run(tmp_path):
    cfg = config()
    single = paths.run_dir(tmp_path / "one", cfg.run)
    loop.train(cfg, single, progress=False)
    mp.spawn(rank_main, args=(2, free_port(), str(tmp_path / "two")), nprocs=2, join=True)
    double = paths.run_dir(tmp_path / "two", config(per_device=16).run)
    assert_same_run(single, double)


def test_gradient_accumulation_reproduces_the_full_batch(tmp_path):
    runs = {}
    for name, per_device in (("whole", None), ("accumulated", 8)):       # 8 micro-batches of 8
        cfg = config(per_device)
        runs[name] = paths.run_dir(tmp_path / name, cfg.run)
        loop.train(cfg, runs[name], progress=False)
    assert_same_run(runs["whole"], runs["accumulated"])


def assert_same_run(single, double):
    def trajectory(rdir):
        return [json.loads(line) for line in (rdir / "stats.jsonl").read_text().splitlines()]

    a, b = trajectory(single), trajectory(double)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert torch.allclose(torch.tensor([r["loss"] for r in a]), torch.tensor([r["loss"] for r in b]), rtol=1e-5)
    wa, wb = checkpoint.load(paths.final_weights(single)), checkpoint.load(paths.final_weights(double))
    for name in wa["ema"]:
        assert torch.allclose(wa["ema"][name], wb["ema"][name], atol=1e-5), name
    assert sorted(p.name for p in (double / "checkpoints").iterdir()) == ["ckpt-000000200.pt", "ckpt-000000300.pt"]
