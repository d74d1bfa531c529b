"""`python -m benchmarks.gpu --quick`: the GPU check end to end on a CPU with tiny sizes, one JSON per figure with
its fields (the figures themselves need a GPU: README, GPU check); and its imports stay free of Snakemake, submitit
and Slurm, which the bare GPU machine lacks."""
import json
import subprocess
import sys

from conftest import REPO

FIELDS = {"benchmark", "title", "date", "machine", "torch", "cuda", "gpu", "git_commit", "command", "timings",
          "ratio", "target", "met", "measured", "compile_backend"}


def test_gpu_check_quick_writes_every_figure(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--quick", "--out", str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(recs) == {"gpu_train", "gpu_sample", "gpu_fid", "gpu_smoke"}
    for name, rec in recs.items():
        assert "error" not in rec, (name, rec["error"])
        assert FIELDS <= set(rec), (name, FIELDS - set(rec))
    train = recs["gpu_train"]
    rows = [row for row in train["rows"] if "skipped" not in row]
    assert not [row for row in rows if "error" in row], [row["error"] for row in rows if "error" in row]
    assert {(row["variant"], row["precision"], row["compile"]) for row in rows} >= {
        (v, p, False) for v in ("edm", "ct", "ict", "ect", "sct") for p in ("fp32", "bf16")}
    for row in rows:
        assert row["img_per_s"] > 0 and row["flops_per_step"] > 0
        assert row["anchor_ratios"]["ect_a100"] == row["img_per_s"] / 285.0
    # sCT's step adds a JVP: more FLOPs than iCT's forward and backward at the same batch
    flops = {row["variant"]: row["flops_per_step"] for row in rows if row["batch"] == 4}
    assert flops["sct"] > flops["ict"]
    assert "not comparable one to one" in train["anchor_note"]
    assert train["profiles"] and "Name" in next(iter(train["profiles"].values()))   # CPU misses every target
    assert {(row["nfe"], row["precision"]) for row in recs["gpu_sample"]["rows"]} == {
        (n, p) for n in (1, 2) for p in ("fp32", "bf16")}
    assert set(recs["gpu_fid"]["libraries"]) == {"torch-fidelity", "clean-fid/clean"}
    smoke = recs["gpu_smoke"]
    assert smoke["loss_falling"] and smoke["losses"][-1] < smoke["losses"][0]
    assert all(v > 0 for v in smoke["fid"].values())


def test_gpu_check_imports_no_workflow_packages():
    code = ("import sys, benchmarks.gpu, cmbench.train.loop, cmbench.sample, cmbench.metrics.fid; "
            "print(sorted(m for m in ('snakemake', 'submitit', 'cmbench.launch', 'cmbench.workflow') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
