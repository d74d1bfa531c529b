"""Config merge order, hashing, and one test per kind of bad config (each a one-line error)."""
import subprocess
import sys

import pytest
import yaml

from cmbench.config import ConfigError, Experiment, parse_overrides
from cmbench.checks import check_run
from cmbench.workflow import Plan
from conftest import REPO, edit_yaml


def resolve(configs, variant="ict", dataset="gauss1d", overrides=None):
    return check_run(Experiment(configs).resolve("toy", dataset, variant, 0, overrides))


def test_merge_order(configs):
    # defaults < dataset < variant < per-dataset override < command line
    edit_yaml(configs / "datasets" / "gauss1d.yaml", {"optim": {"lr": 1e-3}, "train": {"batch": 64, "log_every": 7}})
    edit_yaml(configs / "variants" / "ict.yaml", {"train": {"steps": 100, "batch": 128, "checkpoint_every": 9},
                                                  "per_dataset": {"gauss1d": {"train": {"checkpoint_every": 11}}}})
    cfg = resolve(configs, overrides=parse_overrides(["train.checkpoint_every=13"]))
    assert cfg.optim.lr == 1e-3                      # dataset over defaults
    assert cfg.train.log_every == 7
    assert cfg.train.batch == 128                    # variant over dataset
    assert cfg.train.checkpoint_every == 13          # command line over per-dataset over variant
    assert resolve(configs).train.checkpoint_every == 11
    assert resolve(configs, dataset="ring2d").train.checkpoint_every == 9


def test_a_default_reaches_every_variant_that_does_not_set_it(configs):
    """configs/defaults.yaml is the lowest YAML layer of every variant: a precond value set there reaches all of them,
    whatever their precond.name (a block with another name used to replace it: 4 of 8 saw the value), and an
    optim value reaches the papers' RAdam and Adam blocks too, except where a variant sets it itself."""
    (configs / "defaults.yaml").write_text(yaml.safe_dump({"precond": {"sigma_data": 0.45, "rho": 6.0},
                                                           "optim": {"eps": 1e-7}}))
    exp = Experiment(configs)
    variants = exp.suite("toy")["variants"]
    assert len(variants) == 12
    names = set()
    for suite in ("toy", "cifar10", "imagenet64"):
        dataset = exp.suite(suite)["datasets"][0]
        for v in variants:
            cfg = exp.resolve(suite, dataset, v, 0)
            names.add((cfg.precond.name, cfg.optim.name))
            assert (cfg.precond.sigma_data, cfg.precond.rho) == (0.45, 6.0), (suite, v)
            own = suite == "imagenet64" and v in ("sct", "scd")        # sCM Table 4 sets ε 1e-11
            assert cfg.optim.eps == (1e-11 if own else 1e-7), (suite, v)
    assert {n for n, _ in names} == {"cm", "edm", "trigflow", "flowmap"}
    assert {o for _, o in names} == {"adam", "radam", "adamw"}


def test_the_schema_is_the_lowest_layer(configs):
    """Defaults live in the schema (and each loss's Params), not restated in YAML: an empty defaults.yaml changes
    nothing, and a layer that sets one σ list keeps the schema's others."""
    before = {v: resolve(configs, v).hash for v in ("ct", "ict", "edm", "sct", "ect")}
    (configs / "defaults.yaml").write_text("{}\n")
    assert {v: resolve(configs, v).hash for v in before} == before
    cfg = resolve(configs, overrides={"sample": {"sigmas": {"2": [80.0, 0.5]}}})
    assert cfg.sample.sigmas == {"1": [80.0], "2": [80.0, 0.5]}


def test_hash_is_stable_and_sensitive(configs):
    a, b = resolve(configs), resolve(configs)
    assert a.hash == b.hash and len(a.hash) == 16
    assert resolve(configs, overrides={"train": {"steps": 5}}).hash != a.hash
    assert a.loss["huber_c"] is None and a.loss["s0"] == 10     # loss defaults are filled in, so hashed


def one_line_error(fn, *match):
    with pytest.raises(ConfigError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg
    for m in match:
        assert m in msg, msg
    return msg


def test_unknown_key(configs):
    edit_yaml(configs / "variants" / "ict.yaml", {"train": {"steps": 100, "stepz": 5}})
    one_line_error(lambda: resolve(configs), "unknown key 'train.stepz'", "ict")


def test_unknown_loss_param(configs):
    edit_yaml(configs / "variants" / "ict.yaml", {"loss": {"name": "ict", "s00": 3}})
    one_line_error(lambda: resolve(configs), "loss", "unknown key 's00'")


def test_wrong_type(configs):
    edit_yaml(configs / "variants" / "ict.yaml", {"train": {"steps": "ten"}})
    one_line_error(lambda: resolve(configs), "train.steps", "valid integer")


def test_out_of_range(configs):
    edit_yaml(configs / "variants" / "ct.yaml", {"loss": {"name": "ct", "mu0": 1.5}})
    one_line_error(lambda: resolve(configs, variant="ct"), "mu0")


@pytest.mark.parametrize("name", ["../etc", "a b", "x/y", ""])
def test_unsafe_names(configs, name):
    one_line_error(lambda: Experiment(configs).resolve("toy", "gauss1d", name, 0), "not a safe path component")
    edit_yaml(configs / "experiment.yaml", {"suites": {"toy": {"variants": [name], "datasets": ["gauss1d"],
                                                               "seeds": [0]}}})
    one_line_error(lambda: Plan.from_snakemake({"configs": str(configs)}), "not a safe path component")


def test_unknown_variant_and_loss(configs):
    one_line_error(lambda: resolve(configs, variant="nope"), "no such variant", "known: ", "ict")
    edit_yaml(configs / "variants" / "ict.yaml", {"loss": {"name": "ictt"}})
    one_line_error(lambda: resolve(configs), "'ictt' is not a registered loss", "known: ", "ict")


def test_missing_file(configs, tmp_path):
    edit_yaml(configs / "variants" / "ict.yaml", {"train": {"steps": 10, "init_from": str(tmp_path / "no.pt")}})
    one_line_error(lambda: resolve(configs), "train.init_from", "does not point to a file")


def test_impossible_combinations(configs):
    edit_yaml(configs / "datasets" / "ring2d.yaml", {"dataset": {"kind": "gmm", "layout": "ring", "dim": 3,
                                                                "modes": 8, "std": 0.05}})
    one_line_error(lambda: resolve(configs, dataset="ring2d"), "needs dim 2")
    one_line_error(lambda: resolve(configs, overrides={"sample": {"sigmas": {"2": [0.8, 80.0]}}}), "must descend")
    one_line_error(lambda: resolve(configs, overrides={"sample": {"sigmas": {"2": [80.0]}}}), "has 1 sigmas, which is not NFE 2")
    one_line_error(lambda: resolve(configs, overrides={"sample": {"nfe": [1, 3]}}), "no list for it")
    one_line_error(lambda: resolve(configs, overrides={"sample": {"sampler": "heun"}}), "not NFE 2 with the heun")


def test_bad_snakemake_config_keys(configs):
    one_line_error(lambda: Plan.from_snakemake({"configs": str(configs), "suit": "toy"}), "unknown --config key")
    one_line_error(lambda: Plan.from_snakemake({"configs": str(configs), "suite": "nope"}), "no such suite")


def test_snakemake_dry_run_fails_before_any_job(configs, tmp_path):
    edit_yaml(configs / "variants" / "ict.yaml", {"train": {"steps": 100, "stepz": 5}})
    r = subprocess.run([sys.executable, "-m", "snakemake", "all", "-n", "--cores", "1", "-s", str(REPO / "Snakefile"),
                        "--directory", str(tmp_path), "--config", f"configs={configs}"],
                       capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "cmbench: config error:" in out and "unknown key 'train.stepz'" in out, out
    assert not (tmp_path / "results").exists()


def test_cli_resolve_prints_config_and_hash(configs):
    r = subprocess.run([sys.executable, "-m", "cmbench.cli", "resolve", "--configs", str(configs), "--dataset",
                        "ring2d", "--variant", "ct", "--seed", "1", "--set", "train.steps=7"],
                       capture_output=True, text=True, check=True)
    assert "steps: 7" in r.stdout and "mu_rule: paper" in r.stdout
    expected = check_run(Experiment(configs).resolve("toy", "ring2d", "ct", 1, {"train": {"steps": 7}}))
    assert r.stdout.strip().splitlines()[-1] == f"# hash: {expected.hash}"


def test_new_variant_is_only_a_yaml_file(configs, tmp_path):
    variant = yaml.safe_load((configs / "variants" / "ict.yaml").read_text())
    variant["loss"]["huber_c"] = 0.03
    (configs / "variants" / "ict_c003.yaml").write_text(yaml.safe_dump(variant))
    edit_yaml(configs / "experiment.yaml", {"suites": {"toy": {"variants": ["ict", "ict_c003"],
                                                               "datasets": ["gauss1d"], "seeds": [0]}}})
    r = subprocess.run([sys.executable, "-m", "snakemake", "all", "-n", "--cores", "1", "-s", str(REPO / "Snakefile"),
                        "--directory", str(tmp_path), "--config", f"configs={configs}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "runs/toy/gauss1d/ict_c003/s0/final.pt" in r.stdout
    assert resolve(configs, "ict_c003").loss["huber_c"] == 0.03


def test_planning_checks_the_paper_numbers_and_imports_no_pandas_or_submitit(configs):
    """The Snakefile's plan validates configs/paper_numbers.yaml (the report's input) while it is parsed, and the
    workflow module loads neither pandas nor submitit there (each costs start-up in every `snakemake` call)."""
    code = ("import sys; from cmbench.workflow import Plan; "
            f"Plan.from_snakemake({{'configs': {str(configs)!r}}}); "
            "print(sorted(m for m in ('pandas', 'submitit', 'matplotlib', 'seaborn') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
    papers = configs / "paper_numbers.yaml"
    papers.write_text(papers.read_text().replace("status: confirmed", "status: maybe", 1))
    with pytest.raises(ConfigError, match="paper_numbers.yaml"):
        Plan.from_snakemake({"configs": str(configs)})
