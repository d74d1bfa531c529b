"""What the run hash covers (issue 15, item 5): sampling and evaluation settings key the sample and metric files, not
the training; switching a run dir between configs, any number of times, sets aside and restores training artifacts."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cmbench import checkpoint, paths
from cmbench.checks import check_run, resolve_run
from cmbench.config import ConfigError, Experiment, load_run_config, write_run_config
from cmbench.errors import DamagedFile
from cmbench.launch import run_stage
from cmbench.metrics.evaluate import evaluate_run
from cmbench.train import loop
from conftest import REPO

TINY = {"train": {"steps": 200, "batch": 32, "checkpoint_every": 100, "log_every": 50},
        "sample": {"n": 300}, "evaluate": {"ref_n": 300, "floor_repeats": 1}}


def config(**over):
    """The gauss1d iCT run at toy size (≈1 s of training), with `over` merged into TINY block by block."""
    merged = {k: {**v, **over.get(k, {})} for k, v in TINY.items()} | {k: v for k, v in over.items() if k not in TINY}
    return check_run(Experiment(REPO / "configs").resolve("toy", "gauss1d", "ict", 0, merged))


def train(cfg, rdir) -> int:
    """Train (or not); returns how many steps ran."""
    starts = []
    loop.train(cfg, rdir, progress=False, on_step=starts.append)
    return sum(s < cfg.train.steps for s in starts)      # on_step also reports the end


def snapshot(rdir) -> dict:
    """The bytes of every training artifact in place."""
    ck = paths.checkpoints_dir(rdir)
    files = [paths.stats_file(rdir), paths.final_weights(rdir), *(sorted(ck.iterdir()) if ck.is_dir() else [])]
    return {f.name: f.read_bytes() for f in files if f.exists()}


def test_changing_only_sample_n_keeps_the_training_hash():
    base = config()
    same_training = [{"sample": {"n": 500}}, {"sample": {"seed_start": 7, "batch": 64}},
                     {"evaluate": {"ref_n": 400, "sliced_projections": 8}},
                     {"train": {"checkpoint_every": 50, "keep_checkpoints": 5, "log_every": 10, "threads": 2,
                                "batch_per_device": 8}}]
    for over in same_training:
        assert config(**over).hash == base.hash, over
    other_training = [{"train": {"steps": 300}}, {"train": {"ema_decay": 0.99}}, {"optim": {"lr": 1e-3}},
                      {"precond": {"sigma_data": 0.6}}, {"loss": {"name": "ict", "distance": "l2"}},
                      {"dataset": {"std": 0.7}}]
    for over in other_training:
        assert config(**over).hash != base.hash, over
    seeded = check_run(Experiment(REPO / "configs").resolve("toy", "gauss1d", "ict", 1, TINY))
    assert seeded.hash != base.hash
    # the sample files' keys: every NFE's changes with n, one NFE's with its σ list, none with the batch size
    n = config(sample={"n": 500})
    assert all(n.sample_hash(k) != base.sample_hash(k) for k in (1, 2))
    sig = config(sample={"sigmas": {"1": [80.0], "2": [80.0, 1.5]}})
    assert sig.sample_hash(1) == base.sample_hash(1) and sig.sample_hash(2) != base.sample_hash(2)
    assert config(sample={"batch": 7}).sample_hash(2) == base.sample_hash(2)
    assert config(optim={"lr": 1e-3}).sample_hash(1) != base.sample_hash(1)     # other weights, other samples


def test_fields_outside_the_training_hash_do_not_change_the_weights(tmp_path):
    a, b = config(), config(train={"checkpoint_every": 30, "keep_checkpoints": 1, "log_every": 7})
    assert a.hash == b.hash
    for cfg, where in ((a, tmp_path / "a"), (b, tmp_path / "b")):
        train(cfg, paths.run_dir(where, cfg.run))
    wa, wb = (paths.final_weights(paths.run_dir(tmp_path / w, a.run)).read_bytes() for w in "ab")
    assert wa == wb


def test_changing_only_sample_n_resamples_and_reevaluates_without_retraining(tmp_path):
    """The fused job (`cmbench launch run`) after a re-plan that changed only sample.n. Snakemake deletes a re-run
    job's outputs, final.pt among them: it is rebuilt from the last checkpoint, bit for bit, without a step."""
    old, new = config(), config(sample={"n": 500})
    rdir = paths.run_dir(tmp_path, old.run)
    write_run_config(old, rdir)
    run_stage("run", str(rdir), None)
    trained, stale = snapshot(rdir), paths.samples_file(rdir, 1).read_bytes()
    assert write_run_config(new, rdir)             # the re-plan
    assert train(new, rdir) == 0 and snapshot(rdir) == trained      # final weights of this training exist
    paths.final_weights(rdir).unlink()                              # what Snakemake does before the job
    run_stage("run", str(rdir), None)
    assert snapshot(rdir) == trained               # no step trained, no stats line added, the same weights
    records = json.loads(paths.records_file(rdir).read_text())
    assert {(r["n_gen"], r["config_hash"]) for r in records} == {(500, old.hash)}
    assert {(r["nfe"], r["sample_hash"]) for r in records} == {(1, new.sample_hash(1)), (2, new.sample_hash(2))}
    assert json.loads(paths.config_file(rdir).read_text())["sample_hashes"] == {
        "1": new.sample_hash(1), "2": new.sample_hash(2)}
    # samples made under the old settings are refused, not evaluated
    paths.samples_file(rdir, 1).write_bytes(stale)
    with pytest.raises(DamagedFile, match=f"not the run.s {new.sample_hash(1)}; delete it and re-run snakemake"):
        evaluate_run(rdir, 1, tmp_path)


def test_config_json_refuses_a_hand_edited_sampling_setting(tmp_path):
    cfg = config()
    rdir = paths.run_dir(tmp_path, cfg.run)
    write_run_config(cfg, rdir)
    saved = json.loads(paths.config_file(rdir).read_text())
    assert saved["hash"] == cfg.hash and load_run_config(rdir) == cfg
    saved["config"]["sample"]["n"] = 9          # outside the training hash, inside the file's own
    paths.config_file(rdir).write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"config.json: its config hashes to \w+, not the stored"):
        load_run_config(rdir)


def test_switching_configs_a_third_time_never_wedges_the_run_dir(tmp_path, capsys):
    """A → B → A → B → C → A: each switch sets the current artifacts aside under their hash, and a config seen
    before gets its own back (checkpoints, stats, final weights), so it trains no step again."""
    cfgs = {"A": config(), "B": config(optim={"lr": 1e-3}), "C": config(train={"steps": 150})}
    rdir = paths.run_dir(tmp_path, cfgs["A"].run)
    first = {}
    for name in "ABABCA":
        cfg = cfgs[name]
        ran = train(cfg, rdir)
        assert checkpoint.load(paths.final_weights(rdir))["config_hash"] == cfg.hash
        if name in first:
            assert ran == 0 and snapshot(rdir) == first[name], name     # restored, not retrained
            assert f"config {cfg.hash} again: restored" in capsys.readouterr().err
        else:
            assert ran == cfg.train.steps
            first[name] = snapshot(rdir)
    aside = sorted(p.name for p in rdir.iterdir() if re.search(r"-[0-9a-f]{16}", p.name))
    assert aside == sorted(f"{stem}-{cfgs[n].hash}{suffix}" for n in "BC"
                           for stem, suffix in (("checkpoints", ""), ("final", ".pt"), ("stats", ".jsonl")))


def test_a_run_dir_left_by_the_old_third_switch_recovers(tmp_path):
    """The old set-aside renamed checkpoints/ onto checkpoints-<hash>/ and crashed (Directory not empty) when an
    earlier copy of the same config's was there. Now the second copy takes the next number; nothing is lost."""
    a, b = config(), config(optim={"lr": 1e-3})
    rdir = paths.run_dir(tmp_path, a.run)
    train(a, rdir)
    for p in paths.training_artifacts(rdir):      # an earlier copy of A's artifacts, already set aside
        (shutil.copytree if p.is_dir() else shutil.copy2)(p, paths.set_aside(p, a.hash))
    trained = snapshot(rdir)
    assert train(b, rdir) == b.train.steps
    for p in paths.training_artifacts(rdir):
        assert paths.set_aside(p, a.hash).exists() and paths.set_aside(p, a.hash, 2).exists()
    assert train(a, rdir) == 0 and snapshot(rdir) == trained


def test_switching_back_after_a_run_killed_before_its_first_checkpoint(tmp_path):
    """B was killed before its first checkpoint: its stats lines claim no config. Switching back to A keeps them
    (as stats-unclaimed.jsonl) and restores A's."""
    a, b = config(), config(optim={"lr": 1e-3})
    rdir = paths.run_dir(tmp_path, a.run)
    train(a, rdir)
    trained = snapshot(rdir)
    checkpoint.set_aside_other_config(rdir, b.hash)
    paths.checkpoints_dir(rdir).mkdir()
    paths.stats_file(rdir).write_text('{"step": 49, "loss": 1.0}\n')
    assert train(a, rdir) == 0 and snapshot(rdir) == trained
    assert paths.set_aside(paths.stats_file(rdir), "unclaimed").read_text() == '{"step": 49, "loss": 1.0}\n'


# --- the workflow (Snakemake, one run, separate stages) ---------------------------------------------------------

def snakemake(workdir: Path, sample_n: int) -> dict[str, int]:
    """Run the workflow on one toy run at sample.n; returns the jobs it ran, rule → count."""
    configs = workdir / "configs"
    if not configs.exists():
        shutil.copytree(REPO / "configs", configs)
        suite = {"variants": ["ict"], "datasets": ["gauss1d"], "seeds": [0]}
        (configs / "experiment.yaml").write_text(yaml.safe_dump({"suites": {"one": suite}}))
    sets = (f"train.steps=200 train.batch=32 train.checkpoint_every=100 sample.nfe=[1] sample.n={sample_n} "
            f"evaluate.ref_n=300 evaluate.floor_repeats=1")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "all", "--cores", "2", "-s", str(REPO / "Snakefile"),
           "--directory", str(workdir), "--config", f"configs={configs}", "suite=one", f"set={sets}", "fuse=False"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (r.stdout + r.stderr).split("Job stats:")[1].split("Select jobs")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def test_changing_sample_n_or_evaluate_every_in_the_workflow_reruns_what_depends_on_it(tmp_path):
    """sample.n: sampling and evaluation only. evaluate.every: training too, which redoes the steps its new
    snapshot needs (bit-identical weights), and the records gain the checkpoint's step."""
    assert snakemake(tmp_path, 300)["train"] == 1
    rdir = tmp_path / "results" / "runs" / "one" / "gauss1d" / "ict" / "s0"
    final, stats = paths.final_weights(rdir), paths.stats_file(rdir)
    before = final.stat().st_mtime_ns, final.read_bytes(), stats.read_bytes()
    jobs = snakemake(tmp_path, 500)
    assert "train" not in jobs and jobs["sample"] == jobs["evaluate"] == jobs["collect"] == 1, jobs
    assert (final.stat().st_mtime_ns, final.read_bytes(), stats.read_bytes()) == before
    assert {r["n_gen"] for r in json.loads(paths.records_file(rdir).read_text())} == {500}
    ema = checkpoint.load(final)["ema"]
    suite = {"variants": ["ict"], "datasets": ["gauss1d"], "seeds": [0], "settings": {"evaluate": {"every": 100}}}
    (tmp_path / "configs" / "experiment.yaml").write_text(yaml.safe_dump({"suites": {"one": suite}}))
    jobs = snakemake(tmp_path, 500)
    assert jobs["train"] == jobs["sample"] == jobs["evaluate"] == jobs["collect"] == 1, jobs
    assert all(torch.equal(ema[k], checkpoint.load(final)["ema"][k]) for k in ema)
    assert sorted({r["step"] for r in json.loads(paths.records_file(rdir).read_text())}) == [100, 200]


def test_a_student_retrains_when_its_teacher_does(tmp_path):
    """ECT distils a trained EDM run: the EDM run's training hash is part of ECT's, so a changed teacher config
    changes the student's hash (and Snakemake retrains it); weights of another teacher config are refused."""
    configs = tmp_path / "configs"
    shutil.copytree(REPO / "configs", configs)
    tiny = {"train": {"steps": 20, "batch": 16, "checkpoint_every": 20, "log_every": 10}}

    def resolve(variant):
        return resolve_run(Experiment(configs), "toy", "gauss1d", variant, 0, tiny)
    student, teacher = resolve("ect"), resolve("edm")
    assert student.teacher.hash == teacher.hash
    edm = configs / "variants" / "edm.yaml"
    edm.write_text(edm.read_text().replace("train: {steps: 6000}", "train: {steps: 6000, ema_decay: 0.99}", 1))
    student2, teacher2 = resolve("ect"), resolve("edm")
    assert teacher2.hash != teacher.hash and student2.teacher.hash == teacher2.hash and student2.hash != student.hash
    with pytest.raises(ConfigError, match="teacher.hash is filled in by cmbench"):
        resolve_run(Experiment(configs), "toy", "gauss1d", "ect", 0, {**tiny, "teacher": {"hash": "0" * 16}})

    from cmbench.teacher import build_teacher
    results = tmp_path / "results"
    tdir, sdir = paths.run_dir(results, teacher.run), paths.run_dir(results, student.run)
    write_run_config(teacher, tdir)
    train(teacher, tdir)                                      # the teacher of the first config
    assert build_teacher(student, sdir).trained_by == teacher.hash
    with pytest.raises(ConfigError, match=f"planned against {teacher2.hash}: re-run snakemake"):
        build_teacher(student2, sdir)
