"""`cmbench settings`: each paper suite's resolved settings beside the papers' values."""
import subprocess
import sys

import pytest
import yaml

from cmbench.config import ConfigError
from cmbench.settings import load_paper_settings, mark, settings_table
from conftest import REPO


@pytest.mark.parametrize("suite", ["cifar10", "imagenet64"])
def test_every_listed_setting_is_read_from_the_resolved_config(suite):
    table = settings_table(suite, REPO / "configs")
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| variant")]
    listed = load_paper_settings(REPO / "configs" / "paper_settings.yaml")[suite]
    assert len(rows) == sum(len(v) for v in listed.values())
    marks = {ln.split(" | ")[4] for ln in rows}
    assert marks <= {"✓", "✗", "unverified", "✗ (unverified)", "not stated"}
    # the paper settings this issue fixed now read ✓
    want = {"cifar10": ["| ct | `net.channel_mult_noise` | 2 | 2 | ✓",
                        "| ect | `sample.clip_denoised` | False | False | ✓",
                        "| cd | `sample.clip_denoised` | True | True | ✓"],
            "imagenet64": ["| ect | `loss.double_every` | 3125 | 3125 | ✓",
                           "| sct | `train.ema_sigma_rel` | 0.05 | 0.05 | ✓",
                           "| cd | `net.dropout` | 0 | 0 | ✓",
                           "| ct | `sample.sigmas.2` | [80, 1.912843621] | [80, 1.912843621] | ✓",
                           "| edm | `dataset.conditional` | True | True | ✓"]}[suite]
    for w in want:
        assert any(ln.startswith(w) for ln in rows), w


def test_a_changed_setting_turns_its_mark(configs):
    path = configs / "variants" / "cd.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["per_dataset"]["imagenet64"]["loss"]["n"] = 18
    path.write_text(yaml.safe_dump(cfg))
    rows = settings_table("imagenet64", configs).splitlines()
    assert any(ln.startswith("| cd | `loss.n` | 18 | 40 | ✗") for ln in rows)


def test_marks_and_validation(tmp_path):
    assert mark(0.9992904691, {"paper": 0.9992904691232699, "status": "confirmed"}) == "✓"
    assert mark([80.0, 0.821], {"paper": [80.0, 0.822], "status": "confirmed"}) == "✗"
    assert mark(0.3, {"paper": 0.2, "status": "unverified"}) == "✗ (unverified)"
    assert mark(True, {"paper": 1, "status": "confirmed"}) == "✗"
    assert mark(5, {"paper": None, "status": "confirmed"}) == "not stated"
    bad = tmp_path / "s.yaml"
    bad.write_text("cifar10: {ct: {optim.lr: {paper: 1, source: x, status: maybe}}}")
    with pytest.raises(ConfigError, match="status 'maybe'"):
        load_paper_settings(bad)


def test_cli_prints_the_table():
    r = subprocess.run([sys.executable, "-m", "cmbench.cli", "settings", "--suite", "imagenet64", "--configs",
                        str(REPO / "configs")], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# Settings of suite `imagenet64`") and "| sct | `net.dropout` | 0.45 |" in r.stdout
