"""Damaged state and concurrency (issue 15, items 4 and 6): a flipped bit in a checkpoint or final.pt, a garbage
final.pt, a truncated config.json, a torn stats line, two processes on one run dir."""
import errno
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pandas as pd
import pytest
import torch

from cmbench import checkpoint, cli, io, paths
from cmbench.config import ConfigError, load_run_config, write_run_config
from cmbench.errors import RunDirInUse
from cmbench.report.records import training_curves
from cmbench.train import loop
from test_train import assert_same_weights, config

# checkpoints at 70, 140, 210, 280 (the last two kept), stats lines every 50 steps: not a multiple of 70
SMALL = {"train": {"steps": 300, "batch": 8, "checkpoint_every": 70, "log_every": 50}}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its run dir (checkpoints, stats, final weights) to copy and damage."""
    cfg = config(overrides=SMALL)
    rdir = paths.run_dir(tmp_path_factory.mktemp("ref"), cfg.run)
    loop.train(cfg, rdir, progress=False)
    return rdir


@pytest.fixture
def run(reference, tmp_path):
    """A copy of the reference run dir."""
    rdir = paths.run_dir(tmp_path, config(overrides=SMALL).run)
    shutil.copytree(reference, rdir)
    return rdir


def flip_bit(path):
    """Flip one bit in the middle of the largest entry of a torch zip archive (a tensor's bytes)."""
    with zipfile.ZipFile(path) as z:
        entry = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    local = entry.header_offset      # local header: 30 bytes, then the name and the extra field
    start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") + \
        int.from_bytes(data[local + 28:local + 30], "little")
    data[start + entry.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def stats_lines(rdir):
    """The stats of a run without their timings (the only field a resume may change)."""
    return [{k: v for k, v in json.loads(line).items() if k != "sec_per_kstep"}
            for line in paths.stats_file(rdir).read_text().splitlines()]


class Crash(Exception):
    pass


def crash_at(step):
    def on_step(k):
        if k == step:
            raise Crash
    return on_step


def test_a_flipped_bit_in_a_checkpoint_falls_back_to_the_older_one(run, reference, capsys):
    paths.final_weights(run).unlink()
    older, newest = checkpoint.list_checkpoints(paths.checkpoints_dir(run))
    good = torch.load(newest, weights_only=True)
    flip_bit(newest)
    flipped = torch.load(newest, weights_only=True)       # torch alone loads it without a word...
    assert any(not torch.equal(good["model"][k], flipped["model"][k]) for k in good["model"])
    loop.train(config(overrides=SMALL), run, progress=False)
    err = capsys.readouterr().err
    assert f"skipping unreadable checkpoint {newest}: entry" in err and "fails its CRC-32 check" in err
    assert f"from {older.name}" in err
    assert_same_weights(paths.final_weights(run), paths.final_weights(reference))


def test_a_garbage_final_pt_is_set_aside_and_trained_again(run, reference, capsys):
    final = paths.final_weights(run)
    final.write_bytes(b"not a checkpoint")
    loop.train(config(overrides=SMALL), run, progress=False)
    err = capsys.readouterr().err.splitlines()
    aside = [p for p in run.iterdir() if p.name.startswith("final.pt.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes() == b"not a checkpoint"       # kept, not deleted
    assert any(line.startswith(f"cmbench: {final}: unreadable") and f"set aside as {aside[0].name}" in line
               for line in err)
    assert_same_weights(final, paths.final_weights(reference))


def test_a_flipped_bit_in_final_pt_fails_sampling_in_one_line_then_training_redoes_it(run, reference):
    final = paths.final_weights(run)
    flip_bit(final)
    with pytest.raises(SystemExit) as e:
        cli.main(["launch", "sample", "--run", str(run), "--nfe", "1", "--launcher", "inline"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cmbench: error: {final}: entry") and "CRC-32" in msg
    assert "set aside as final.pt.damaged-" in msg and "re-run snakemake" in msg
    assert not final.exists() and not paths.samples_file(run, 1).exists()
    loop.train(config(overrides=SMALL), run, progress=False)
    assert_same_weights(final, paths.final_weights(reference))


def test_a_truncated_config_json_is_set_aside_and_rewritten_when_planning(run, capsys):
    path = paths.config_file(run)
    torn = path.read_text()[:100]
    path.write_text(torn)
    cfg = config(overrides=SMALL)
    assert write_run_config(cfg, run)
    err = capsys.readouterr().err.strip()
    aside = [p for p in run.iterdir() if p.name.startswith("config.json.damaged-")]
    assert len(aside) == 1 and aside[0].read_text() == torn
    assert err == f"cmbench: {path}: damaged (JSONDecodeError); set aside as {aside[0].name} and rewritten"
    assert load_run_config(run).hash == cfg.hash


def test_a_truncated_config_json_fails_a_stage_in_one_line_naming_the_fix(run):
    path = paths.config_file(run)
    path.write_text(path.read_text()[:100])
    with pytest.raises(ConfigError, match="re-run snakemake"):
        load_run_config(run)
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--run", str(run)])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"cmbench: error: {path}: damaged") and "re-run snakemake" in msg


def test_a_torn_stats_line_is_dropped_on_resume(run, reference, capsys):
    """Killed mid-line at step 250 (newest checkpoint 210): the torn line goes, the lines after 210 are redone."""
    cfg = config(overrides=SMALL)
    shutil.rmtree(paths.checkpoints_dir(run))
    paths.final_weights(run).unlink()
    with pytest.raises(Crash):
        loop.train(cfg, run, progress=False, on_step=crash_at(250))
    stats = paths.stats_file(run)
    with stats.open("a") as f:
        f.write('{"step": 299, "lo')
    loop.train(cfg, run, progress=False)
    err = capsys.readouterr().err
    assert f"{stats}: dropped 1 torn line(s)" in err and "from ckpt-000000210.pt" in err
    assert [r["step"] for r in stats_lines(run)] == [49, 99, 149, 199, 249, 299]     # none twice, none torn
    assert_same_weights(paths.final_weights(run), paths.final_weights(reference))


def test_resumed_stats_equal_uninterrupted_ones_when_checkpoints_fall_between_lines(run, reference):
    """A resume from step 210 (between the lines of steps 199 and 249) writes the same step-249 line as the
    uninterrupted run: the loss window of steps 200–209 travels in the checkpoint."""
    cfg = config(overrides=SMALL)
    shutil.rmtree(paths.checkpoints_dir(run))
    paths.final_weights(run).unlink()
    with pytest.raises(Crash):
        loop.train(cfg, run, progress=False, on_step=crash_at(250))
    loop.train(cfg, run, progress=False)
    assert stats_lines(run) == stats_lines(reference)


def test_the_report_skips_a_torn_stats_line_with_one_warning(run, capsys):
    stats = paths.stats_file(run)
    stats.write_text(stats.read_text() + '{"step": 349, "loss": 0.')
    df = pd.DataFrame({"records_file": [str(paths.records_file(run))], "dataset": ["ring2d"], "variant": ["ct"],
                       "seed": [0]})
    curves = training_curves(df)
    assert sorted(curves["step"].unique()) == [49, 99, 149, 199, 249, 299]
    assert capsys.readouterr().err == f"cmbench: {stats}: skipped 1 torn line(s)\n"


HOLD = """import sys
from cmbench import io
with io.locked(sys.argv[1], "run dir", shared=sys.argv[2] == "shared"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding a lock file (exclusive or shared) until the test ends."""
    procs = []

    def hold(path, mode):
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(path), mode], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline() == "held\n"
        return p
    yield hold
    for p in procs:
        p.stdin.close()
        p.wait(timeout=30)


def test_a_second_trainer_of_a_run_dir_stops_in_one_line(run, reference, holder):
    paths.final_weights(run).unlink()
    stats_before = paths.stats_file(run).read_text()
    lock = paths.lock_file(run)
    other = holder(lock, "exclusive")
    for argv in (["train", "--run", str(run)],
                 ["launch", "run", "--run", str(run), "--launcher", "inline"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"cmbench: error: run dir {run} is in use by pid {other.pid} on")
        assert f"lock file {lock}" in msg
    assert paths.stats_file(run).read_text() == stats_before and not paths.final_weights(run).exists()
    other.stdin.close()
    other.wait(timeout=30)
    loop.train(config(overrides=SMALL), run, progress=False)      # the lock went with its process
    assert stats_lines(run) == stats_lines(reference)              # resumed from 280: no line twice


def test_samplers_share_a_run_dir_but_never_with_a_trainer(tmp_path, holder):
    lock = tmp_path / ".lock"
    holder(lock, "shared")
    with io.locked(lock, "run dir", shared=True):       # a second sampler (another NFE) goes ahead
        pass
    with pytest.raises(RunDirInUse, match="in use by a sampler"):
        with io.locked(lock, "run dir"):
            pass


def test_a_file_system_without_locks_warns_in_one_line_and_goes_on(tmp_path, monkeypatch, capsys):
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(io.fcntl, "flock", refuse)
    ran = False
    with io.locked(tmp_path / ".lock", "run dir R"):
        ran = True
    assert ran and capsys.readouterr().err == (f"cmbench: {tmp_path / '.lock'}: the file system refuses locks "
                                               f"({os.strerror(errno.ENOLCK)}); run dir R goes unlocked\n")
