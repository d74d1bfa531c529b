"""train.precision (fp32 | bf16 | fp16 with a dynamic loss scale) and train.compile, on CPU: both track fp32, resume
stays bit-identical under each, fp16 skips an overflowing step, and the defaults keep every existing hash."""
import json
import shutil

import pytest
import torch

from cmbench import checkpoint, paths
from cmbench.checks import check_run
from cmbench.config import Experiment, config_hash
from cmbench.train import loop
from conftest import REPO

STEPS = {"train": {"steps": 4, "batch": 32, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 4}}


@pytest.fixture(autouse=True)
def traced_compile(monkeypatch):
    """train.compile through dynamo and AOTAutograd without inductor's C++ build (minutes on a loaded CPU); the
    inductor test below opts back in."""
    monkeypatch.setattr(loop, "COMPILE_BACKEND", "aot_eager")


def config(variant="ct", train=None, suite="toy", dataset="ring2d"):
    overrides = {"train": {**STEPS["train"], **(train or {})}}
    if variant == "ect":
        overrides["teacher"] = None                     # from scratch, not from a trained EDM run's weights
    if dataset == "digits":
        overrides["net"] = {"model_channels": 16}       # a tiny DDPM++ (SongUNet) on 8×8 digits
        overrides["train"]["batch"] = 8
    return check_run(Experiment(REPO / "configs").resolve(suite, dataset, variant, 0, overrides))


def run(tmp_path, cfg, name):
    rdir = paths.run_dir(tmp_path / name, cfg.run)
    final = loop.train(cfg, rdir, progress=False)
    losses = [json.loads(line)["loss"] for line in paths.stats_file(rdir).read_text().splitlines()]
    return checkpoint.load(final)["model"], losses, rdir


def test_defaults_keep_existing_hashes():
    """fp32 without compile (and every other later field at its default: a one-time net, no flow map, no weight
    decay) hashes as the config did before those fields existed; bf16 is another training."""
    cfg = config()
    old = cfg.to_dict()
    del old["train"]["precision"], old["train"]["compile"], old["net"]["time2"], old["precond"]["flowmap"]
    del old["optim"]["weight_decay"]
    assert cfg.content_hash == config_hash(old)
    assert config(train={"compile": True}).hash == cfg.hash        # a resource: the same numbers within round-off
    assert config(train={"precision": "bf16"}).hash != cfg.hash


# variant families on the toy MLP (sct on gauss1d, its toy home), and iCT on a tiny DDPM++ image run
FAMILIES = [("ct", "toy", "ring2d"), ("ict", "toy", "ring2d"), ("ect", "toy", "ring2d"), ("cd", "toy", "ring2d"),
            ("sct", "toy", "gauss1d"), ("edm", "toy", "ring2d"), ("ict", "digits", "digits")]


@pytest.mark.parametrize("variant,suite,dataset", FAMILIES, ids=[f"{v}-{d}" for v, _, d in FAMILIES])
def test_bf16_and_compiled_runs_track_fp32(tmp_path, variant, suite, dataset):
    """Same init, data and noise: compiled (aot_eager) losses agree with fp32 to 1e-5 relative and its weights to
    1e-5 of their update; bf16 (8 mantissa bits) agrees to 5% on the loss and 30% of the weight update."""
    cfg = config(variant, None, suite, dataset)
    ref, ref_loss, _ = run(tmp_path, cfg, "fp32")
    torch.manual_seed(cfg.run.seed)             # as Trainer.build seeds the initial weights
    init = loop.build_model(cfg).state_dict()
    moved = sum((ref[k] - init[k]).float().norm() ** 2 for k in ref) ** 0.5
    for option, loss_tol, weight_tol in (({"compile": True}, 1e-5, 1e-5), ({"precision": "bf16"}, 0.05, 0.3)):
        w, losses, _ = run(tmp_path, config(variant, option, suite, dataset), next(iter(option)))
        assert losses == pytest.approx(ref_loss, rel=loss_tol), option
        diff = sum((w[k] - ref[k]).float().norm() ** 2 for k in ref) ** 0.5
        assert diff <= weight_tol * moved, (option, float(diff), float(moved))


@pytest.mark.parametrize("option", [{"precision": "bf16"}, {"precision": "fp16"}, {"compile": True}],
                         ids=["bf16", "fp16", "compile"])
def test_resume_is_bit_identical_under_each_option(tmp_path, option):
    """Resuming from the step-2 checkpoint (the step-4 one and the final weights removed) ends on the same bytes
    of weights, EMA, target network, optimizer and (fp16) loss scale as the uninterrupted run."""
    cfg = config("ct", option)
    _, losses, rdir = run(tmp_path, cfg, "run")
    ckdir = paths.checkpoints_dir(rdir)
    whole = checkpoint.load(checkpoint.ckpt_path(ckdir, 4))
    paths.final_weights(rdir).unlink()
    checkpoint.ckpt_path(ckdir, 4).unlink()
    _, resumed_losses, _ = run(tmp_path, cfg, "run")
    again = checkpoint.load(checkpoint.ckpt_path(ckdir, 4))
    assert resumed_losses == losses
    for key in ("model", "ema", "target"):
        assert all(torch.equal(whole[key][k], again[key][k]) for k in whole[key]), key
    assert str(whole["optimizer"]) == str(again["optimizer"])
    assert whole.get("loss_scale") == again.get("loss_scale")
    assert ("loss_scale" in whole) == (option.get("precision") == "fp16")


class InfAt:
    """Wraps a loss and makes its value +inf at one step (an fp16 overflow)."""

    def __init__(self, inner, step):
        self.inner, self.step = inner, step

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, model, target, x0, step, draws, labels=None):
        out = self.inner(model, target, x0, step, draws, labels)
        return out * float("inf") if step == self.step else out


def test_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path, monkeypatch):
    build = loop.losses.build
    monkeypatch.setattr(loop.losses, "build",
                        lambda cfg, teacher=None, model=None: InfAt(build(cfg, teacher, model), 2))
    cfg = config("ct", {"precision": "fp16", "checkpoint_every": 1, "keep_checkpoints": 5})
    _, losses, rdir = run(tmp_path, cfg, "run")
    ck = [checkpoint.load(checkpoint.ckpt_path(paths.checkpoints_dir(rdir), k)) for k in (2, 3, 4)]
    for key in ("model", "ema", "target"):       # step 2 (third) left everything as it was; step 3 moved on
        assert all(torch.equal(ck[0][key][k], ck[1][key][k]) for k in ck[0][key]), key
        assert not all(torch.equal(ck[1][key][k], ck[2][key][k]) for k in ck[1][key]), key
    assert str(ck[0]["optimizer"]) == str(ck[1]["optimizer"])
    assert [c["loss_scale"] for c in ck] == [{"scale": 2.0**16, "good": 2, "skipped": 0},
                                             {"scale": 2.0**15, "good": 0, "skipped": 1},
                                             {"scale": 2.0**15, "good": 1, "skipped": 1}]
    stats = [json.loads(line) for line in paths.stats_file(rdir).read_text().splitlines()]
    assert losses[2] is None and all(x is not None for i, x in enumerate(losses) if i != 2)
    assert [s["skipped_steps"] for s in stats] == [0, 0, 1, 1]


def test_sct_bf16_on_the_unet_takes_its_jvp_in_fp32(tmp_path):
    """Forward-mode AD through autocast failed on the U-Net's convolutions (input fp32, weight bf16); sCT's JVP
    now runs in fp32 under autocast, and the bf16 run's losses track fp32's."""
    cfg = config("sct", {"steps": 2, "batch": 4}, "digits", "digits").model_copy(update={"teacher": None})
    _, ref, _ = run(tmp_path, cfg, "fp32")
    bf16 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "bf16"})})
    _, losses, _ = run(tmp_path, bf16, "bf16")
    assert losses == pytest.approx(ref, rel=0.05)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="torch.compile's inductor backend builds C++ kernels on CPU: no C++ compiler here")
def test_inductor_compiled_run_tracks_fp32(tmp_path, monkeypatch):
    """The backend train.compile uses for real (inductor fuses and reorders float ops: 1e-4 relative)."""
    monkeypatch.setattr(loop, "COMPILE_BACKEND", "inductor")
    fast = {"steps": 2, "checkpoint_every": 2}
    _, ref, _ = run(tmp_path, config("ct", fast), "fp32")
    _, compiled, _ = run(tmp_path, config("ct", {**fast, "compile": True}), "compiled")
    assert compiled == pytest.approx(ref, rel=1e-4)
