"""Issue 15, items 1 and 2: config parsing as a careless or hostile user tries it. Every bad input is a one-line
error naming the file or key at fault; a hostile results path runs every job and no command."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from snakemake.cli import parse_config

from cmbench import cli
from cmbench.checks import check_run
from cmbench.config import ConfigError, Experiment, parse_overrides
from cmbench.workflow import Plan
from conftest import REPO, edit_yaml


def one_line_error(fn, *match) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300, msg
    for m in match:
        assert m in msg, msg
    return msg


def cli_error(argv, capsys, *match) -> str:
    """`cmbench ARGV` in this process: it exits with one line on stderr (no traceback)."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    msg = str(e.value.code)
    assert msg.startswith("cmbench: error:") and "\n" not in msg and len(msg) < 300, msg
    for m in match:
        assert m in msg, msg
    return msg


def resolve(configs, overrides=None, variant="ict"):
    return check_run(Experiment(configs).resolve("toy", "gauss1d", variant, 0, overrides))


def plan(configs, **config):
    """The workflow's plan from what `snakemake --config KEY=VALUE ...` hands it (Snakemake's own parsing)."""
    return Plan.from_snakemake({"configs": str(configs), **parse_config([f"{k}={v}" for k, v in config.items()])})


def test_exponent_floats_without_a_dot_are_floats_in_files_set_and_snakemake_config(configs, capsys):
    (configs / "variants" / "ict.yaml").write_text("loss: {name: ict}\ntrain: {steps: 100}\n"
                                                   "optim: {lr: 2e-4, eps: 1e10}\n")
    cfg = resolve(configs)
    assert (cfg.optim.lr, cfg.optim.eps) == (2e-4, 1e10)
    one_line_error(lambda: resolve(configs, parse_overrides(["optim.eps=-2E+5"])), "optim.eps", "greater than 0",
                   "(got -200000.0)")      # read as a number (a string would be "not a valid number")
    cfg = resolve(configs, parse_overrides(["optim.lr=3e-4", "optim.eps=1e10"]))
    assert (cfg.optim.lr, cfg.optim.eps) == (3e-4, 1e10)
    cli.main(["resolve", "--configs", str(configs), "--dataset", "gauss1d", "--variant", "ict", "--seed", "0",
              "--set", "optim.lr=3e-4"])
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["lr"] == 3e-4
    # Snakemake reads `--config set=...` itself (int, float, bool, YAML of strings) before the plan parses it
    cfgs = plan(configs, set="optim.lr=5e-4 train.steps=7").runs.values()
    assert {(c.optim.lr, c.train.steps) for c in cfgs} == {(5e-4, 7)}


def test_a_key_set_whole_and_inside_and_a_non_string_set_are_one_line_errors(configs, capsys):
    cli_error(["resolve", "--configs", str(configs), "--dataset", "gauss1d", "--variant", "ict", "--seed", "0",
               "--set", "train=5", "--set", "train.steps=10"], capsys, "'train=5' and 'train.steps=10' conflict")
    one_line_error(lambda: plan(configs, set=5), "overrides must be key.path=value strings, got 5")
    one_line_error(lambda: plan(configs, set="train=5"), "train:", "valid dictionary", "(got 5)")
    # the same key twice: the last wins, as on any command line
    assert resolve(configs, parse_overrides(["train.steps=3", "train.steps=4"])).train.steps == 4


def test_an_empty_or_non_mapping_yaml_or_block_names_its_file(configs):
    """Before: an empty variant file gave an 855-character line dumping the merged config, naming no file; a
    per_dataset or scale block that is not a mapping crashed with AttributeError."""
    variant, scale = configs / "variants" / "ict.yaml", configs / "scales" / "smoke.yaml"
    for text, got in (("", "empty"), ("# all commented out\n", "empty"), ("- a\n- b\n", "mapping of keys, not list")):
        variant.write_text(text)
        one_line_error(lambda: resolve(configs), str(variant), got)
    variant.write_text("loss: {name: ict}\ntrain: {steps: 10}\nper_dataset: {gauss1d: [1]}\n")
    one_line_error(lambda: resolve(configs), f"{variant}: per_dataset.gauss1d: must be a mapping of keys, not list")
    variant.write_text("loss: {name: ict}\ntrain: {steps: 10}\nrun: {seed: 3}\n")       # used to be dropped silently
    one_line_error(lambda: resolve(configs), "'run' is not a setting")
    scale.write_text("all: 5\n")
    one_line_error(lambda: Experiment(configs).resolve("toy", "gauss1d", "edm", 0, scale="smoke"),
                   f"{scale}: all: must be a mapping of keys, not int")


def test_an_override_key_with_an_empty_part_is_refused(configs):
    for item in (".steps=5", "train..steps=5", "train.=5", "=5"):
        one_line_error(lambda: parse_overrides([item]), repr(item), "non-empty keys")


def test_a_duplicate_yaml_key_names_file_and_line(configs):
    variant = configs / "variants" / "ict.yaml"
    variant.write_text("loss: {name: ict}\ntrain:\n  steps: 100\n  batch: 64\n  steps: 200\n")
    one_line_error(lambda: resolve(configs), str(variant), "line 5: duplicate key 'steps' (first on line 3)")
    one_line_error(lambda: parse_overrides(["optim={lr: 1e-3, lr: 2e-3}"]), "duplicate key 'lr'")


@pytest.mark.parametrize("item, match", [
    ("optim.lr=.inf", "optim.lr: Input should be a finite number"),
    ("optim.lr=.nan", "optim.lr: Input should be a finite number"),
    ("precond.sigma_max=.inf", "precond.sigma_max: Input should be a finite number"),
    ("loss.mu0=.nan", "loss: mu0: Input should be a finite number"),       # a loss's own parameters too
    ("train.steps=1e29", "train.steps: Input should be a valid integer"),
    ("train.steps=100000000000000000000000000000", "train.steps: Input should be less than or equal to 1000000000"),
    ("train.checkpoint_every=10000000000", "train.checkpoint_every: Input should be less than or equal to"),
])
def test_non_finite_floats_and_absurd_step_counts_are_refused(configs, item, match):
    one_line_error(lambda: resolve(configs, parse_overrides([item]), variant="ct"), match)


def test_unknown_or_path_like_suites_are_refused_in_every_entry(configs, tmp_path, capsys):
    known = "known: cifar10, digits, imagenet64, toy"
    run = ["--configs", str(configs), "--dataset", "gauss1d", "--variant", "ict", "--seed", "0"]
    results = tmp_path / "deep" / "results"
    cli_error(["resolve", "--suite", "nope", *run], capsys, "no such suite", known)
    cli_error(["resolve", "--suite", "../../x", *run, "--write", str(results)], capsys, "not a safe path component")
    cli_error(["settings", "--suite", "nope", "--configs", str(configs)], capsys, "no such suite", known)
    cli_error(["report", "--suite", "../x", "--records", "r.json", "--tables", str(results)], capsys,
              "not a safe path component")
    one_line_error(lambda: plan(configs, suite="nope"), "no such suite", known)
    one_line_error(lambda: plan(configs, suite="../../x", results=results), "not a safe path component")
    one_line_error(lambda: Experiment(configs).resolve("../../x", "gauss1d", "ict", 0), "not a safe path component")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs"]      # nothing written anywhere


def test_batch_per_device_and_rank_divisibility_are_checked_at_plan_time(configs, tmp_path):
    # the variants whose losses take any batch (Shortcut needs bootstrap rows per step level, IMM groups of 4)
    toy = {"variants": ["ct", "ict", "edm", "cd", "direct_cm", "sct", "scd", "ect", "meanflow"],
           "datasets": ["gauss1d", "ring2d"], "seeds": [0, 1]}
    edit_yaml(configs / "experiment.yaml", {"suites": {"toy": toy}})
    one_line_error(lambda: plan(configs, set="train.batch_per_device=7"),
                   "train: batch_per_device 7 does not divide batch 512")
    assert {c.train.batch_per_device for c in plan(configs, set="train.batch_per_device=128").runs.values()} == {128}
    # on Slurm a training job has one rank per task: 512 does not split into 3 ranks
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump({"jobs": {k: {"tasks_per_node": 3} for k in
                                                ("teacher", "train", "sample", "evaluate")}}))
    one_line_error(lambda: plan(configs, launcher="slurm", launch_config=cluster),
                   "train.batch 512 does not split into 3 rank(s)", str(cluster))
    one_line_error(lambda: plan(configs, launcher="slurm", launch_config=cluster, set="train.batch=12 "
                                "train.batch_per_device=8"), "train: batch_per_device 8 does not divide batch 12")
    cluster.write_text(yaml.safe_dump({"jobs": {k: {"tasks_per_node": 2} for k in
                                                ("teacher", "train", "sample", "evaluate")}}))
    one_line_error(lambda: plan(configs, launcher="slurm", launch_config=cluster, set="train.batch=12 "
                                "train.batch_per_device=4"), "does not split into 2 rank(s) × micro-batches of "
                   "train.batch_per_device 4")
    assert plan(configs, launcher="slurm", launch_config=cluster, set="train.batch=12 train.batch_per_device=3").runs


# a directory name a shell would split, unquote or run: spaces, both quotes, $( ), backticks, a newline
HOSTILE = "a b 'c' \"d\" $(touch PWNED) `touch PWNED2` ;x\nnext line"


def test_a_results_path_with_spaces_quotes_newline_and_command_substitution_runs_every_job_and_no_command(tmp_path):
    """The smallest real workflow (one toy run at one NFE, separate train/sample/evaluate/collect jobs, reference
    and report) with its configs and results under a hostile directory: every job runs, every file arrives at
    the path as given, and no command in the path runs. Before, `{log}` and `--records` went to the shell
    unquoted, and a path with a space failed every job."""
    root = tmp_path / HOSTILE
    configs, results = root / "configs", root / "results"
    shutil.copytree(REPO / "configs", configs)
    (configs / "experiment.yaml").write_text(yaml.safe_dump(
        {"suites": {"mini": {"variants": ["ict"], "datasets": ["gauss1d"], "seeds": [0]}}}))
    # the paths travel as Snakemake config values from a file: a newline survives no command-line parsing
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "configs": str(configs), "results": str(results), "suite": "mini", "fuse": False,
        "set": "train.steps=20 train.checkpoint_every=10 train.log_every=10 sample.n=200 sample.nfe=[1] "
               "evaluate.ref_n=200 evaluate.floor_repeats=2"}))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run([sys.executable, "-m", "snakemake", "all", "--cores", "2", "-s", str(REPO / "Snakefile"),
                        "--directory", str(tmp_path), "--configfile", str(tmp_path / "config.yaml")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = results / "runs" / "mini" / "gauss1d" / "ict" / "s0"
    for f in ("config.json", "final.pt", "samples/nfe1.npz", "metrics/nfe1-data.json", "metrics/records.json",
              "logs/train.log", "logs/sample-nfe1.log", "logs/evaluate-nfe1-data.log", "logs/collect.log"):
        assert (run / f).is_file(), f
    assert (results / "tables" / "records_mini.csv").read_text().count("\n") > 1
    assert (results / "tables" / "logs" / "report-mini.log").is_file()
    assert [p.name for p in tmp_path.rglob("PWNED*")] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".snakemake", HOSTILE, "config.yaml"])


def test_a_results_path_with_braces_is_refused_not_read_as_wildcards(configs, tmp_path):
    one_line_error(lambda: plan(configs, results=tmp_path / "res{suite}"), "braces", "res{suite}")
