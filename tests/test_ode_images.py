"""The ODE error on images (cmbench.metrics.ode_ref): the teacher's Heun solution of the sampling noise is the
reference, it converges, a model that returns it scores its convergence error, records appear at one step for
runs with a trained teacher only, the reference is shared, follows the teacher's weights and is a declared input
of the workflow, and the ODE-vs-quality study reads image records. A tiny digits teacher (8 channels, a few steps
at a high learning rate so that its flow is not the untrained net's linear one)."""
import json

import numpy as np
import pandas as pd
import pytest

from cmbench import checkpoint, io, paths
from cmbench.checks import resolve_run
from cmbench.config import Experiment, parse_overrides, write_run_config
from cmbench.metrics import evaluate, ode_ref
from cmbench.metrics.keys import FD, FID, ODE_ERROR
from cmbench.report.claims import DIRECT_CM_VS_CD, ode_vs_quality, write_ode_vs_quality
from cmbench.report.records import load_records
from cmbench.sample import sample_run
from cmbench.seeds import initial_noise
from cmbench.teacher import NetworkTeacher
from cmbench.train import loop
from conftest import REPO

SMALL = ["net.model_channels=8", "train.steps=4", "train.batch=16", "optim.lr=0.01", "sample.n=24",
         "sample.batch=24", "evaluate.ode_n=16", "evaluate.floor_repeats=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """results dir, and {variant: (config, run dir)} of the trained EDM teacher, CD (its student) and iCT (no
    teacher), each student sampled at NFE 1 and 2."""
    results = tmp_path_factory.mktemp("ode")
    exp, out = Experiment(REPO / "configs"), {}
    for variant in ("edm", "cd", "ict"):
        cfg = resolve_run(exp, "digits", "digits", variant, 0, parse_overrides(SMALL))
        rdir = paths.run_dir(results, cfg.run)
        write_run_config(cfg, rdir)
        loop.train(cfg, rdir, progress=False)
        for nfe in (1, 2) if variant != "edm" else ():
            sample_run(rdir, nfe)
        out[variant] = cfg, rdir
    return results, out


@pytest.fixture(scope="module")
def reference(runs):
    """The CD run's cached reference (built by its first evaluation) and the teacher."""
    results, r = runs
    cfg, rdir = r["cd"]
    for nfe in (1, 2):
        evaluate.evaluate_run(rdir, nfe, results)
    ref_file = evaluate.reference_path(cfg, 1, results, ode_ref.REFERENCE)
    return ref_file, dict(np.load(ref_file)), NetworkTeacher(r["edm"][1])


def teacher_solution(cfg, teacher, steps: int) -> np.ndarray:
    return ode_ref.solution(teacher.model, initial_noise(cfg, 1, ode_ref.seeds(cfg)), steps, cfg.sigma_list(1)[0],
                            teacher.cfg.precond, 64)


def test_heun_reference_converges_and_two_steps_do_not(runs, reference):
    """256 σ against 512 on the check subset: a discrepancy far below what a 2-step Heun solve is off by, and
    far below the per-image sum of squares of the solution itself."""
    cfg = runs[1]["cd"][0]
    _, ref, teacher = reference
    assert (int(ref["steps"]), int(ref["check_steps"]), int(ref["check_n"])) == (256, 512, 16)
    assert np.array_equal(ref["seeds"], np.arange(16)) and ref["images"].shape == (16, 8, 8, 1)
    coarse = ode_ref.error(teacher_solution(cfg, teacher, 2), ref["images"])
    size = ode_ref.error(ref["images"], np.full_like(ref["images"], 127))       # ≈ ||Φ||² per image
    assert float(ref["convergence"]) < 1e-3 * coarse and coarse > 0.01 * size, (ref["convergence"], coarse, size)


def test_the_teachers_own_ode_solution_scores_its_solver_error(runs, reference):
    """Samples that are the teacher's Heun-512 solution of each sample's noise score exactly the reference's
    recorded 256-vs-512 discrepancy (ode_n = the check subset), a small nonzero number; the same images one seed
    off score far more (the reference is paired with the samples' own noise)."""
    results, r = runs
    cfg, rdir = r["cd"]
    _, ref, teacher = reference
    samples = paths.samples_file(rdir, 1)
    smp = dict(np.load(samples))
    smp["images"][:16] = teacher_solution(cfg, teacher, 512)
    io.save_npz(samples, **smp)
    try:
        rec = {x["metric"]: x for x in json.loads(evaluate.evaluate_run(rdir, 1, results).read_text())}[ODE_ERROR]
    finally:
        sample_run(rdir, 1)      # the run's own samples back, for the other tests
    assert rec["value"] == rec["ode_ref_convergence"] == float(ref["convergence"]) > 0
    assert ode_ref.error(np.roll(smp["images"][:16], 1, axis=0), ref["images"]) > 1e4 * rec["value"]


def test_records_at_one_step_for_runs_with_a_teacher_only(runs, reference):
    """CD (distils the teacher): fd at NFE 1 and 2, ode_error at NFE 1 with ideal 0 and the reference's
    convergence; iCT (no teacher): fd only. The reference is shared by every student of the teacher."""
    results, r = runs
    for v in ("cd", "ict"):
        evaluate.evaluate_run(r[v][1], 1, results)
    df = load_records([paths.metrics_file(r[v][1], n) for v in ("cd", "ict") for n in (1, 2) if (v, n) != ("ict", 2)])
    assert set(zip(df.variant, df.nfe, df.metric)) == {("cd", 1, FD), ("cd", 2, FD), ("cd", 1, ODE_ERROR),
                                                       ("ict", 1, FD)}
    ode = df[df.metric == ODE_ERROR].iloc[0]
    assert ode.ideal == 0 and ode.n_gen == 16 and 0 < ode.ode_ref_convergence < 1e-3 * ode.value
    assert (ode.ode_ref_steps, ode.ode_ref_convergence_steps, ode.ode_ref_convergence_n) == (256, 512, 16)
    exp = Experiment(REPO / "configs")
    direct = resolve_run(exp, "digits", "digits", "direct_cm", 0, parse_overrides(SMALL))
    assert (evaluate.reference_sets(direct, 1, "data") == ["data", ode_ref.REFERENCE]
            and evaluate.reference_sets(direct, 2, "data") == ["data"] and reference[0].name.startswith("ode-"))
    assert evaluate.reference_path(direct, 1, results, ode_ref.REFERENCE) == reference[0]


def test_new_teacher_weights_rebuild_the_reference(runs, reference, capsys, monkeypatch):
    """The cached solution names the teacher weights it was solved with: other weights (same training config)
    set it aside and solve again (the solve itself is the fixture's; here it is only asked for)."""
    results, r = runs
    cfg, rdir = r["cd"]
    final, ref_file = paths.final_weights(r["edm"][1]), reference[0]
    saved = {f: f.read_bytes() for f in (final, ref_file)}
    asked = []
    monkeypatch.setattr(evaluate, "build_reference", lambda *a: asked.append(a) or a[2].write_bytes(saved[ref_file]))
    state = checkpoint.load(final)
    state["ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["ema"].items()}
    try:
        evaluate.load_reference(cfg, 1, ref_file, ode_ref.REFERENCE)       # the same weights: cached
        assert asked == []
        io.save_torch(final, state)
        evaluate.load_reference(cfg, 1, ref_file, ode_ref.REFERENCE)
        assert [a[2:] for a in asked] == [(ref_file, ode_ref.REFERENCE)]
        assert "made for key" in capsys.readouterr().err and ref_file.with_name(ref_file.name + ".corrupt").exists()
    finally:
        for f, b in saved.items():
            f.write_bytes(b)


def image_records(ode: dict, quality: dict) -> pd.DataFrame:
    """Digits-like records of three seeds: {variant: value} for ode_error (NFE 1) and pixel FD and two FID
    backends (NFE 1 and 2); the quality values are scaled per metric and seed."""
    rows = [{"suite": "s", "dataset": "digits", "variant": v, "seed": s, "nfe": n, "metric": m, "backend": b,
             "mode": mode, "value": x * (1 + 0.01 * s), "ideal": None}
            for m, b, mode, per, nfes in ((ODE_ERROR, "cmbench-pixels", "", ode, (1,)),
                                          (FD, "cmbench-pixels", "", quality, (1, 2)),
                                          (FID, "torch-fidelity", "", quality, (1, 2)),
                                          (FID, "clean-fid", "clean", quality, (1, 2)))
            for v, x in per.items() for n in nfes for s in range(3)]
    return pd.DataFrame(rows)


def test_the_verdict_reads_image_records():
    """Image records: one verdict per quality column at NFE 1 (pixel FD and each FID backend), none at NFE 2
    (no ODE error there); iCT (no ODE error) is not in the table."""
    df = image_records({"cd": 3.0, "direct_cm": 1.0}, {"cd": 10.0, "direct_cm": 20.0, "ict": 5.0})
    table, verdicts = ode_vs_quality(df, DIRECT_CM_VS_CD)
    assert list(zip(verdicts.nfe, verdicts.quality_metric, verdicts.outcome)) == [
        (1, "fd", "holds"), (1, "fid [clean-fid/clean]", "holds"), (1, "fid [torch-fidelity]", "holds")]
    assert set(table.variant) == {"cd", "direct_cm"} and set(table.NFE) == {1}
    _, swapped = ode_vs_quality(image_records({"cd": 1.0, "direct_cm": 3.0}, {"cd": 10.0, "direct_cm": 20.0}),
                                DIRECT_CM_VS_CD)
    assert list(swapped.outcome) == ["does not hold"] * 3


def test_the_digits_study_has_a_table_not_the_no_records_line(runs, reference, tmp_path):
    results, r = runs
    df = load_records([paths.metrics_file(r["cd"][1], n) for n in (1, 2)])
    write_ode_vs_quality(df, "digits", tmp_path, DIRECT_CM_VS_CD)
    md = (tmp_path / "ode_vs_quality_digits.md").read_text()
    assert "No ode_error records" not in md and "digits, NFE 1, fd: not evaluated: no Direct CM records" in md


def test_the_workflow_declares_the_teachers_solution_and_its_weights(tmp_path):
    """The digits plan: CD's NFE-1 evaluation (and its fused job) reads the teacher's ODE solution, whose job reads
    the teacher's final weights; NFE 2 and iCT do not."""
    from types import SimpleNamespace

    from cmbench.workflow import Plan
    plan = Plan.from_snakemake({"suite": "digits", "results": str(tmp_path)})
    w = {v: SimpleNamespace(suite="digits", dataset="digits", variant=v, seed="0", metric="data", nfe=n)
         for v, n in (("cd", "1"), ("ict", "1"))}
    ode = [f for f in plan.reference(w["cd"]) if "/ode-" in f]
    assert len(ode) == 1 and not any("/ode-" in f for f in plan.reference(w["ict"]))
    assert ode[0] in plan.references(w["cd"]) and not any("/ode-" in f for f in plan.references(w["ict"]))
    assert not any("/ode-" in f for f in plan.reference(SimpleNamespace(**{**vars(w["cd"]), "nfe": "2"})))
    name = SimpleNamespace(name=ode[0].rsplit("/", 1)[1].removesuffix(".npz"))
    assert plan.reference_inputs(name) == [str(tmp_path / "runs/digits/digits/edm/s0/final.pt")]
    assert plan.reference_args(ode[0])[-2:] == ["--metric", ode_ref.REFERENCE]
