"""`python -m benchmarks --quick` plumbing: one JSON per benchmark with the agreed fields. Nothing here is timed:
the figures themselves are measured by `python -m benchmarks` (README, Benchmarks), never asserted in tests."""
import json
import subprocess
import sys

from conftest import REPO

FIELDS = {"benchmark", "title", "date", "machine", "torch", "git_commit", "git_dirty", "command", "timings",
          "repeats", "ratio", "target", "met", "measured"}


def test_bench_quick_writes_one_record_per_benchmark(tmp_path):
    # from the repository root, as the README runs it: benchmarks/ is not installed, and configs/ is read there
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "harness,sct,ode",
                        "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    names = {"harness_step_mlp", "harness_step_unet", "sct_vs_ict_mlp", "sct_vs_ict_unet", "ode_ground_truth"}
    assert {p.stem for p in tmp_path.glob("*.json")} == names
    for name in names:
        rec = json.loads((tmp_path / f"{name}.json").read_text())
        assert FIELDS <= set(rec), (name, FIELDS - set(rec))
        assert rec["benchmark"] == name and rec["repeats"] == 1
        assert rec["command"].startswith("python -m benchmarks")
        assert {"cpu_model", "cpuinfo_processors", "os_cpu_count"} <= set(rec["machine"])
        assert isinstance(rec["met"], bool) and rec["ratio"] > 0 and rec["target"]["op"] == "<="
    for net in ("mlp", "unet"):
        rec = json.loads((tmp_path / f"harness_step_{net}.json").read_text())
        # the bare loop is the same computation as the harness: identical weights after the same steps
        assert rec["final_weights_max_abs_diff"] == 0.0
        assert rec["checkpoint_every"] > 0 and rec["log_every"] > 0
    ode = json.loads((tmp_path / "ode_ground_truth.json").read_text())
    assert ode["max_abs_diff"] < 1e-6
    assert r.stdout.count("\n| ") == 1 + len(names) and (tmp_path / "table.md").exists()
