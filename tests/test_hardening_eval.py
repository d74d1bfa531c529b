"""Issue 15, items 3 and 4 (evaluation side): FID weights are checked against the official SHA-256 before anything
loads them, and damaged or mismatched sample files, cached references and records fail in one line (or are rebuilt)
instead of yielding a metric or a traceback."""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from cmbench import cli, io, paths
from cmbench.checks import check_run
from cmbench.config import Experiment
from cmbench.errors import DamagedFile, UnverifiedWeights
from cmbench.metrics import evaluate, fid
from cmbench.metrics.evaluate import evaluate_run
from cmbench.metrics.files import read_records, write_records
from cmbench.sample import sample_run
from cmbench.train import loop
from conftest import REPO


class Touch:
    """Unpickling this creates `marker`: what a crafted weights file could do with any command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def crafted_weights(folder: Path, name: str) -> tuple[Path, Path]:
    import torch
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "ran"
    torch.save({"Conv2d_1a_3x3.conv.weight": Touch(marker)}, folder / name)
    return folder / name, marker


def test_a_crafted_weights_file_is_refused_before_it_is_loaded(tmp_path, monkeypatch):
    monkeypatch.delenv(fid.UNVERIFIED_ENV)
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path / "w"))
    images = np.zeros((2, 8, 8, 3), np.uint8)

    def never():
        raise AssertionError("reference images loaded although the weights are refused")

    for spec, name in [("torch-fidelity", fid.TF_WEIGHTS), ("clean-fid/clean", fid.CF_WEIGHTS)]:
        path, marker = crafted_weights(tmp_path / "w", name)
        for call in (lambda: fid.features(images, spec), lambda: fid.reference_stats(never, spec, {}, tmp_path / "c")):
            with pytest.raises(UnverifiedWeights) as e:
                call()
            msg = str(e.value)
            assert "\n" not in msg and str(path) in msg and f"{fid.UNVERIFIED_ENV}=1" in msg, msg
            assert not marker.exists()
        path.unlink()
    # the file really is hostile: loaded the way torch-fidelity loads weights (weights_only=False), it runs code
    path, marker = crafted_weights(tmp_path / "w", fid.TF_WEIGHTS)
    import torch
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_crafted_weights_file_stops_the_workflow_before_any_job(tmp_path):
    """Planning (the Snakefile's parse) computes the FID reference keys: the refusal is one line there."""
    import os
    import subprocess
    import sys
    path, marker = crafted_weights(tmp_path / "w", fid.TF_WEIGHTS)
    env = {k: v for k, v in os.environ.items() if k != fid.UNVERIFIED_ENV}
    env.update({fid.WEIGHTS_ENV: str(path.parent), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"})
    r = subprocess.run([sys.executable, "-m", "snakemake", "all", "-n", "--cores", "1", "--config", "suite=digits",
                        f"results={tmp_path / 'results'}", "set=evaluate.fid=[torch-fidelity]"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("cmbench: config error")]
    assert r.returncode != 0 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert str(path.absolute()) in err[0] and fid.UNVERIFIED_ENV in err[0] and not marker.exists()


def test_only_the_official_weights_pass_without_the_opt_in(tmp_path, monkeypatch):
    # torch.hub's convention: the 8 hex digits in the file name start its SHA-256
    assert fid.OFFICIAL_SHA256[fid.TF_WEIGHTS].startswith(fid.TF_WEIGHTS.rsplit("-", 1)[1].split(".")[0])
    w = tmp_path / fid.TF_WEIGHTS
    w.write_bytes(b"not the official file")
    monkeypatch.delenv(fid.UNVERIFIED_ENV)
    with pytest.raises(UnverifiedWeights, match="is not the official file's 6726825d0af5f729"):
        fid.verify_weights(w)
    monkeypatch.setitem(fid.OFFICIAL_SHA256, fid.TF_WEIGHTS, io.file_sha256(w))
    assert fid.verify_weights(w) is True
    monkeypatch.setitem(fid.OFFICIAL_SHA256, fid.TF_WEIGHTS, "0" * 64)
    monkeypatch.setenv(fid.UNVERIFIED_ENV, "1")
    assert fid.verify_weights(w) is False
    # clean-fid's file has no known official hash: only the opt-in accepts it
    (tmp_path / fid.CF_WEIGHTS).write_bytes(b"x")
    monkeypatch.setenv(fid.UNVERIFIED_ENV, "0")
    with pytest.raises(UnverifiedWeights, match="knows no official SHA-256"):
        fid.verify_weights(tmp_path / fid.CF_WEIGHTS)


def test_unverified_weights_opt_in_runs_fid_and_marks_the_records(tmp_path, monkeypatch):
    from cmbench.report.records import load_records
    from cmbench.report.tables import _dataset_note
    weights = fid.write_random_inception(tmp_path / "w" / fid.TF_WEIGHTS)
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(weights.parent))   # the opt-in is set for every test (conftest)
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8) for _ in range(2))
    np.savez(tmp_path / "a.npz", images=a)
    ref = fid.reference_stats(lambda: b, "torch-fidelity", {"d": 1}, tmp_path / "ref", dims=64)
    rec = fid.fid_npz(tmp_path / "a.npz", ref, "torch-fidelity", dims=64)
    assert rec["weights_verified"] is False and np.isfinite(rec["value"]) and rec["value"] > 0
    # the tables' notes say so
    r = {"suite": "s", "dataset": "digits", "variant": "ict", "seed": 0, "nfe": 1, "mode": None, "ideal": None,
         "n_gen": 6, "sigmas": [80.0], **{k: rec[k] for k in ("metric", "value", "backend", "weights_verified")}}
    io.write_json(tmp_path / "records.json", [r])
    note = _dataset_note("digits", load_records([tmp_path / "records.json"]), load_records([tmp_path / "records.json"]))
    assert "UNVERIFIED Inception weights" in note
    io.write_json(tmp_path / "records.json", [{**r, "weights_verified": True}])
    records = load_records([tmp_path / "records.json"])
    assert "UNVERIFIED" not in _dataset_note("digits", records, records)


# ------------------------------------------------------------------------------------------- samples, references

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A 2-step iCT run on ring2d, sampled at NFE 1 and 2 and evaluated once (so the references are cached); tests
    work on copies."""
    root = tmp_path_factory.mktemp("toy")
    cfg = check_run(Experiment(REPO / "configs").resolve("toy", "ring2d", "ict", 0, {
        "train": {"steps": 2, "batch": 16}, "sample": {"n": 64, "nfe": [1, 2]},
        "evaluate": {"ref_n": 256, "floor_repeats": 1, "sliced_projections": 16}}))
    rdir = paths.run_dir(root / "results", cfg.run)
    loop.train(cfg, rdir, progress=False)
    for nfe in (1, 2):
        sample_run(rdir, nfe)
        evaluate_run(rdir, nfe, root / "results")
    return root


@pytest.fixture
def run(toy, tmp_path):
    """(run dir, results dir) of a private copy of the toy run, with no metric records yet."""
    shutil.copytree(toy / "results", tmp_path / "results")
    rdir = next((tmp_path / "results").rglob("final.pt")).parent
    for f in (rdir / "metrics").glob("*"):
        f.unlink()
    return rdir, tmp_path / "results"


def rewrite(path: Path, **changes) -> None:
    z = dict(np.load(path))
    z.update(changes)
    np.savez(path, **z)


def assert_one_line_and_no_record(rdir, results, nfe, *needles):
    with pytest.raises(DamagedFile) as e:
        evaluate_run(rdir, nfe, results)
    msg = str(e.value)
    assert "\n" not in msg and str(paths.samples_file(rdir, nfe)) in msg and "re-run snakemake" in msg, msg
    assert "allow_pickle" not in msg
    for n in needles:
        assert n in msg, msg
    assert not paths.metrics_file(rdir, nfe, "data").exists()
    return msg


def test_an_intact_sample_file_gives_finite_records(run):
    rdir, results = run
    records = read_records(evaluate_run(rdir, 2, results))
    assert records and all(np.isfinite(r["value"]) for r in records) and {r["nfe"] for r in records} == {2}
    evaluate_run(rdir, 1, results)
    assert len(read_records(evaluate.collect_records(rdir))) == 2 * len(records)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_samples_fail_in_one_line_and_write_no_record(run, bad):
    rdir, results = run
    f = paths.samples_file(rdir, 1)
    x = np.load(f)["samples"].copy()
    x[3, 1] = bad
    rewrite(f, samples=x)
    assert_one_line_and_no_record(rdir, results, 1, "samples", "non-finite")


def test_nfe2_samples_copied_over_nfe1_are_refused(run):
    rdir, results = run
    shutil.copy(paths.samples_file(rdir, 2), paths.samples_file(rdir, 1))
    assert_one_line_and_no_record(rdir, results, 1, "NFE 2, not 1")


def test_a_tampered_checkpoint_sha256_is_refused(run):
    rdir, results = run
    f = paths.samples_file(rdir, 1)
    meta = json.loads(str(np.load(f)["meta"]))
    rewrite(f, meta=json.dumps({**meta, "checkpoint_sha256": "0123456789abcdef"}))
    assert_one_line_and_no_record(rdir, results, 1, "checkpoint 0123456789abcdef", "final.pt")


def test_samples_from_another_final_pt_are_refused(run):
    rdir, results = run
    with open(paths.final_weights(rdir), "ab") as f:   # the run's final.pt changed after sampling
        f.write(b"\0")
    assert_one_line_and_no_record(rdir, results, 1, "final.pt")


@pytest.mark.parametrize("case", ["sigmas", "seeds", "shape", "x_t", "meta"])
def test_samples_with_another_sigma_list_seeds_or_shape_are_refused(run, case):
    rdir, results = run
    f = paths.samples_file(rdir, 2)
    z = np.load(f)
    meta = json.loads(str(z["meta"]))
    change = {"sigmas": dict(sigmas=z["sigmas"] * 2, meta=json.dumps({**meta, "sigmas": (z["sigmas"] * 2).tolist()})),
              "seeds": dict(seeds=z["seeds"] + 1),
              "shape": dict(samples=z["samples"][:, :1], x_t=z["x_t"][:, :1]),
              "x_t": dict(x_t=z["x_t"] + 1),
              "meta": dict(meta="{not json")}[case]
    rewrite(f, **change)
    assert_one_line_and_no_record(rdir, results, 2, {"sigmas": "σ list", "seeds": "seeds", "shape": "samples are",
                                                     "x_t": "x_t", "meta": "meta"}[case])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle", "empty", "missing array"])
def test_a_damaged_sample_file_fails_in_one_line_without_numpy_advice(run, damage):
    rdir, results = run
    f = paths.samples_file(rdir, 1)
    data = f.read_bytes()
    if damage == "truncated":
        f.write_bytes(data[:len(data) // 2])
    elif damage == "garbage":
        f.write_bytes(bytes(range(256)) * 8)
    elif damage == "pickle":
        f.write_bytes(pickle.dumps({"samples": [1, 2]}))      # numpy would advise allow_pickle=True
    elif damage == "empty":
        f.write_bytes(b"")
    else:
        z = dict(np.load(f))
        del z["seeds"]
        np.savez(f, **z)
    assert_one_line_and_no_record(rdir, results, 1, "damaged")


def test_a_damaged_sample_file_is_one_line_from_the_cli(run):
    rdir, results = run
    paths.samples_file(rdir, 1).write_bytes(pickle.dumps([1]))
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--run", str(rdir), "--nfe", "1", "--results", str(results)])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code and "re-run snakemake" in e.value.code


@pytest.mark.parametrize("damage", ["garbage", "nan", "other key"])
def test_a_corrupt_cached_reference_is_set_aside_and_rebuilt(run, damage, capsys):
    rdir, results = run
    cfg = evaluate.load_run_config(rdir)
    ref = evaluate.reference_path(cfg, 1, results)
    good = dict(np.load(ref))
    if damage == "garbage":
        ref.write_bytes(b"\x00garbage")
    elif damage == "nan":
        rewrite(ref, exact=np.full_like(good["exact"], np.nan))
    else:
        rewrite(ref, key="0" * 16)
    records = read_records(evaluate_run(rdir, 1, results))
    assert records and all(np.isfinite(r["value"]) for r in records)
    rebuilt = np.load(ref)
    assert all(np.array_equal(rebuilt[k], good[k]) for k in good)
    assert ref.with_name(ref.name + ".corrupt").exists()
    err = [ln for ln in capsys.readouterr().err.splitlines() if "corrupt cached reference" in ln]
    assert len(err) == 1 and str(ref) in err[0]


def test_records_never_hold_nan_or_infinity(tmp_path):
    r = {"metric": "w2", "value": 1.0, "ideal": None}
    for bad in (float("nan"), float("inf")):
        with pytest.raises(DamagedFile, match="w2 value came out"):
            write_records(tmp_path / "m.json", [{**r, "value": bad}])
        assert not (tmp_path / "m.json").exists()
    # a records file that holds them (written by an older version, or by hand) is refused when read
    (tmp_path / "old.json").write_text('[{"metric": "w2", "value": NaN}]')
    with pytest.raises(DamagedFile, match="old.json"):
        read_records(tmp_path / "old.json")
    from cmbench.report.records import load_records
    with pytest.raises(DamagedFile, match="NaN is not a number"):
        load_records([tmp_path / "old.json"])
