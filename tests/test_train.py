"""The training loop: bit-identical resume after SIGKILL, NaN guards, torn checkpoints, idempotence."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cmbench import paths
from cmbench.config import Experiment
from cmbench.errors import TrainingDiverged
from cmbench import checkpoint
from cmbench.train import loop
from cmbench.checks import check_run
from conftest import REPO

FAST = {"train": {"steps": 1500, "batch": 64, "checkpoint_every": 200, "log_every": 50}}


def config(variant="ct", overrides=FAST):
    return check_run(Experiment(REPO / "configs").resolve("toy", "ring2d", variant, 0, overrides))


def assert_same_weights(a, b):
    a, b = checkpoint.load(a), checkpoint.load(b)
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A reference run of the CT config (it keeps a target network, so every piece of state is exercised)."""
    cfg = config()
    rdir = paths.run_dir(tmp_path_factory.mktemp("ref"), cfg.run)
    return loop.train(cfg, rdir, progress=False)


def test_sigkill_then_resume_is_bit_identical(tmp_path, uninterrupted):
    plan = [sys.executable, "-m", "cmbench.cli", "resolve", "--configs", str(REPO / "configs"), "--write",
            str(tmp_path), "--dataset", "ring2d", "--variant", "ct", "--seed", "0", "--set", "train.steps=1500",
            "--set", "train.batch=64", "--set", "train.checkpoint_every=200", "--set", "train.log_every=50"]
    rdir = paths.run_dir(tmp_path, config().run)
    assert subprocess.run(plan, capture_output=True, text=True, check=True).stdout.strip() == str(rdir)
    cmd = [sys.executable, "-m", "cmbench.cli", "train", "--run", str(rdir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.list_checkpoints(rdir / "checkpoints") and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not paths.final_weights(rdir).exists(), "the run finished before it could be killed"
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "resuming" in r.stderr
    assert_same_weights(paths.final_weights(rdir), uninterrupted)
    steps = [json.loads(line)["step"] for line in (rdir / "stats.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 1499      # no duplicated or missing log lines


def test_torn_newest_checkpoint_is_skipped(tmp_path, uninterrupted, capsys):
    cfg = config()
    rdir = paths.run_dir(tmp_path, cfg.run)
    loop.train(cfg, rdir, progress=False)
    paths.final_weights(rdir).unlink()
    older, newest = checkpoint.list_checkpoints(rdir / "checkpoints")[-2:]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])     # a torn write
    loop.train(cfg, rdir, progress=False)
    err = capsys.readouterr().err
    assert f"skipping unreadable checkpoint {newest}" in err and f"from {older.name}" in err
    assert_same_weights(paths.final_weights(rdir), uninterrupted)


def test_finished_run_is_not_retrained(tmp_path):
    cfg = config(overrides={"train": {"steps": 20, "batch": 8}})
    rdir = paths.run_dir(tmp_path, cfg.run)
    final = loop.train(cfg, rdir, progress=False)
    mtime = final.stat().st_mtime_ns
    assert loop.train(cfg, rdir, progress=False) == final and final.stat().st_mtime_ns == mtime


class Poisoned:
    """Wraps a loss and poisons one step: the value itself, or only its gradient."""

    def __init__(self, inner, step, where):
        self.inner, self.step, self.where = inner, step, where

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, model, target, x0, step, generator, labels=None):
        out = self.inner(model, target, x0, step, generator, labels)
        if step == self.step:
            p = next(model.parameters())
            out = out * float("nan") if self.where == "loss" else out + (p * 0).sqrt().sum()  # d√0 = inf·0 = nan
        return out


@pytest.mark.parametrize("where,quantity", [("loss", "non-finite loss"), ("grad", "non-finite gradient norm")])
def test_non_finite_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, where, quantity):
    build = loop.losses.build
    monkeypatch.setattr(loop.losses, "build",
                        lambda cfg, teacher=None, model=None: Poisoned(build(cfg, teacher, model), 450, where))
    cfg = config("ict")
    rdir = paths.run_dir(tmp_path, cfg.run)
    with pytest.raises(TrainingDiverged) as e:
        loop.train(cfg, rdir, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ict (") and "step 450" in msg and quantity in msg
    state, path = checkpoint.load_latest_valid(rdir / "checkpoints")
    assert state["step"] == 400 and path.name in msg
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not paths.final_weights(rdir).exists()


def test_changed_config_sets_old_checkpoints_aside(tmp_path, capsys):
    cfg = config(overrides={"train": {"steps": 300, "batch": 8, "checkpoint_every": 100}})
    rdir = paths.run_dir(tmp_path, cfg.run)
    loop.train(cfg, rdir, progress=False)
    old = sorted(p.name for p in (rdir / "checkpoints").iterdir())
    other = config(overrides={"train": {"steps": 400, "batch": 8, "checkpoint_every": 100}})
    loop.train(other, rdir, progress=False)
    err = capsys.readouterr().err
    assert "config changed" in err and "resuming" not in err
    assert sorted(p.name for p in (rdir / f"checkpoints-{cfg.hash}").iterdir()) == old     # kept, untouched
    assert (rdir / f"stats-{cfg.hash}.jsonl").exists() and (rdir / f"final-{cfg.hash}.pt").exists()
    assert checkpoint.load(paths.final_weights(rdir))["config_hash"] == other.hash


def test_power_function_ema_is_edm2s_profile():
    """EDM2's power-function EMA (Karras et al. 2024, Eq. 3): γ solves σ_rel = sqrt((γ + 1)/((γ + 2)²(γ + 3))), and
    the recursion with β_k = (k/(k + 1))^(γ + 1) averages iterate i with weight i^(γ+1) − (i − 1)^(γ+1) exactly
    (the integral of t^γ over its step); β_0 = 0, so the average starts at the first iterate."""
    from types import SimpleNamespace
    g = loop.power_ema_gamma(0.05)
    assert np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))) == pytest.approx(0.05, rel=1e-12)
    t = SimpleNamespace(ema_decay=0.999)
    assert loop.ema_beta(t, 7, None) == 0.999 and loop.ema_beta(t, 0, g) == 0.0
    theta = np.random.default_rng(0).standard_normal(50)
    avg = 0.0
    for step, th in enumerate(theta):
        b = loop.ema_beta(t, step, g)
        avg = b * avg + (1 - b) * th
    i = np.arange(1, 51)
    w = i ** (g + 1) - (i - 1) ** (g + 1)
    assert avg == pytest.approx((w * theta).sum() / w.sum(), rel=1e-10)
