"""Quality against training budget: evaluate.every snapshots, the step / images / seconds / FLOPs of every record,
the FLOP count, and the matched-budget suite."""
import json

import pytest
import torch

from cmbench import checkpoint, io, paths
from cmbench.checks import check_run
from cmbench.config import ConfigError, Experiment, write_run_config
from cmbench.launch import run_stage
from cmbench.metrics.evaluate import reference_key
from cmbench.nets import build_model
from cmbench.teacher import build_teacher
from cmbench.train import flops, loop
from conftest import REPO, edit_yaml

TINY = {"train": {"steps": 30, "batch": 16, "checkpoint_every": 5, "keep_checkpoints": 10, "log_every": 5},
        "sample": {"n": 200}, "evaluate": {"ref_n": 500, "floor_repeats": 1, "sliced_projections": 16}}


def config(every=10, variant="ct", steps=30):
    over = {**TINY, "train": {**TINY["train"], "steps": steps}, "evaluate": {**TINY["evaluate"], "every": every}}
    return check_run(Experiment(REPO / "configs").resolve("toy", "ring2d", variant, 0, over))


def same_ema(a, b) -> bool:
    a, b = checkpoint.load(a)["ema"], checkpoint.load(b)["ema"]
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def mlp_hand_count(cfg) -> int:
    """2·in·out per linear layer of the toy MLP (the counter counts matrix products only)."""
    n, dim = cfg.net, cfg.dataset.dim
    widths = [dim + n.emb_features] + [n.width] * n.depth + [dim]
    return sum(2 * a * b for a, b in zip(widths, widths[1:]))


@pytest.mark.parametrize("variant,passes", [("edm", 3), ("ct", 4), ("cd", 4), ("sct", 6)])
def test_training_flops_are_the_loss_passes_times_the_hand_counted_mlp(variant, passes):
    cfg = config(variant=variant)
    model = build_model(cfg)
    assert flops.forward_flops(model, cfg, "cpu") == mlp_hand_count(cfg) == 2 * (18 * 128 + 2 * 128 * 128 + 128 * 2)
    teacher = build_teacher(cfg, REPO, "cpu")       # cd: the exact denoiser, numpy: no network FLOPs
    assert flops.flops_per_step(cfg, model, teacher, "cpu") == passes * mlp_hand_count(cfg) * cfg.train.batch


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A fused run (train, sample, evaluate, collect) of CT with evaluate.every 10 over 30 steps."""
    cfg = config()
    rdir = paths.run_dir(tmp_path_factory.mktemp("every"), cfg.run)
    write_run_config(cfg, rdir)
    run_stage("run", str(rdir), None)
    return cfg, rdir


def test_records_at_each_checkpoint_step_have_the_final_metric_set_and_consistent_budgets(run):
    cfg, rdir = run
    records = json.loads(paths.records_file(rdir).read_text())
    steps = sorted({r["step"] for r in records})
    assert steps == [10, 20, 30]
    metrics = {s: sorted((r["nfe"], r["metric"]) for r in records if r["step"] == s) for s in steps}
    assert metrics[10] == metrics[20] == metrics[30] and len(metrics[30]) == 2 * 5
    per_step = flops.flops_per_step(cfg, build_model(cfg), None, "cpu")
    for r in records:
        assert r["images"] == r["step"] * cfg.train.batch
        assert r["train_flops"] == r["step"] * per_step
    seconds = [next(r["train_seconds"] for r in records if r["step"] == s) for s in steps]
    assert 0 < seconds[0] < seconds[1] < seconds[2]


def test_the_last_step_records_are_the_final_weights_and_earlier_ones_their_snapshots(run):
    cfg, rdir = run
    records = json.loads(paths.records_file(rdir).read_text())
    for r in records:
        weights = paths.final_weights(rdir) if r["step"] == cfg.train.steps else paths.weights_file(rdir, r["step"])
        assert r["checkpoint_sha256"] == io.file_sha256(weights)[:16]
    assert sorted(p.name for p in paths.checkpoints_dir(rdir).glob("ema-*")) == ["ema-000000010.pt",
                                                                                   "ema-000000020.pt"]


class Crash(Exception):
    pass


def test_a_resumed_run_writes_the_snapshots_of_an_uninterrupted_one(tmp_path, run):
    cfg, ref = run
    rdir = paths.run_dir(tmp_path, cfg.run)

    def crash(step):
        if step == 17:
            raise Crash
    with pytest.raises(Crash):
        loop.train(cfg, rdir, progress=False, on_step=crash)
    assert not paths.final_weights(rdir).exists()
    loop.train(cfg, rdir, progress=False)
    for step in (10, 20):
        assert same_ema(paths.weights_file(rdir, step), paths.weights_file(ref, step))
    assert same_ema(paths.final_weights(rdir), paths.final_weights(ref))
    seconds = [checkpoint.load(paths.weights_file(rdir, s))["train_seconds"] for s in (10, 20)]
    assert seconds[0] < seconds[1] < checkpoint.load(checkpoint.ckpt_path(rdir / "checkpoints", 30))["train_seconds"]


def test_a_new_evaluate_every_retrains_only_for_missing_snapshots(tmp_path, run, capsys):
    _, ref = run
    plain = config(every=None)
    rdir = paths.run_dir(tmp_path, plain.run)
    loop.train(plain, rdir, progress=False)
    assert not list(paths.checkpoints_dir(rdir).glob("ema-*"))
    loop.train(config(every=10), rdir, progress=False)        # from the checkpoint at step 5
    for step in (10, 20):
        assert same_ema(paths.weights_file(rdir, step), paths.weights_file(ref, step))
    assert same_ema(paths.final_weights(rdir), paths.final_weights(ref))
    before = paths.final_weights(rdir).stat().st_mtime_ns
    loop.train(config(every=20), rdir, progress=False)        # its one snapshot exists: nothing to do
    assert paths.final_weights(rdir).stat().st_mtime_ns == before


def test_evaluate_every_changes_neither_the_training_sampling_nor_reference_hashes():
    a, b = config(every=None), config(every=10)
    assert a.hash == b.hash and a.sample_hash(1) == b.sample_hash(1)
    assert reference_key(a, 1) == reference_key(b, 1)
    assert a.content_hash != b.content_hash


def test_the_matched_suite_gives_every_variant_the_same_steps_batch_and_checkpoints():
    exp = Experiment(REPO / "configs")
    s = exp.suite("toy_matched")
    cfgs = [exp.resolve("toy_matched", d, v, 0) for d in s["datasets"] for v in s["variants"]]
    assert {(c.train.steps, c.train.batch, tuple(c.evaluated_steps())) for c in cfgs} == {(4000, 512, (1000, 2000, 3000))}
    toy = [exp.resolve("toy", "ring2d", v, 0) for v in exp.suite("toy")["variants"]]
    assert len({c.train.steps for c in toy}) > 1          # the default suite keeps its per-variant budgets
    # and a step every variant is evaluated at: a snapshot, or the final weights (TCM's stage 2 runs 2000 steps)
    assert all(2000 in c.evaluated_steps() or c.train.steps == 2000 for c in toy)


def test_suite_settings_that_are_not_a_mapping_are_one_line_errors(configs):
    edit_yaml(configs / "experiment.yaml", {"suites": {"x": {"variants": ["ct"], "datasets": ["ring2d"],
                                                           "seeds": [0], "settings": [1]}}})
    with pytest.raises(ConfigError, match=r"experiment.yaml: suite 'x': settings: must be a mapping"):
        Experiment(configs).suite("x")



def test_a_snapshot_is_the_ema_a_run_of_that_many_steps_ends_with(tmp_path):
    """EDM's loss and a constant EMA decay do not depend on train.steps: the snapshot after 10 of 30 steps is
    the final EMA of a 10-step run."""
    long, short = config(every=10, variant="edm"), config(every=None, variant="edm", steps=10)
    loop.train(long, paths.run_dir(tmp_path / "long", long.run), progress=False)
    loop.train(short, paths.run_dir(tmp_path / "short", short.run), progress=False)
    assert same_ema(paths.weights_file(paths.run_dir(tmp_path / "long", long.run), 10),
                    paths.final_weights(paths.run_dir(tmp_path / "short", short.run)))
