"""The paper suites (CIFAR-10, ImageNet 64): every config resolves and builds, both plan on local copies in their
real on-disk formats, and their smoke scale runs the whole DAG (teacher → students → samples → FID with a random
Inception → tables) on a CPU, with local cores and through the dev Slurm cluster."""
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cmbench import losses
from cmbench.config import ConfigError, Experiment
from cmbench.data.synthetic import write_cifar10, write_imagenet64
from cmbench.metrics import fid
from cmbench.nets import build_model
from cmbench.workflow import Plan
from conftest import REPO
from test_image_suite import run_snakemake
from test_workflow import planned_jobs

PAPER = ("cifar10", "imagenet64")
WRITERS = {"cifar10": write_cifar10, "imagenet64": write_imagenet64}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Synthetic copies of both datasets in their release formats (40 images each); `weights`: a random
    torch-fidelity Inception (what the smoke scale runs); `plan-weights`: that and a stand-in for clean-fid's
    TorchScript file, which the papers' scale names in its reference keys (planning hashes it, never loads it)."""
    root = tmp_path_factory.mktemp("paper-data")
    out = {"cifar10": WRITERS["cifar10"](root / "cifar10", per_batch=8).parent,
           "imagenet64": WRITERS["imagenet64"](root / "imagenet64", per_batch=4)}
    out["weights"], out["plan-weights"] = root / "weights", root / "plan-weights"
    fid.write_random_inception(out["weights"] / fid.TF_WEIGHTS)
    shutil.copytree(out["weights"], out["plan-weights"])
    (out["plan-weights"] / fid.CF_WEIGHTS).write_bytes(b"not read at plan time")
    return out


def build_every_run(configs: Path, data: dict, scale: str | None = None) -> int:
    """Plan every suite of experiment.yaml (which resolves and checks each run and teacher, and that each
    init_student matches its teacher's network), then build each run's network on the meta device and its loss.
    Returns how many runs were built."""
    built = 0
    for suite in Experiment(configs).suites:
        datasets = Experiment(configs).suite(suite)["datasets"]
        sets = [f"dataset.path={data[d]}" for d in datasets if d in PAPER][:1]
        plan = Plan.from_snakemake({"suite": suite, "configs": str(configs), "set": sets,
                                    **({"scale": scale} if scale else {})})
        for cfg in [*plan.runs.values(), *plan.teacher_runs.values()]:
            with torch.device("meta"):
                model = build_model(cfg)
                losses.build(cfg, model=model)
            assert sum(p.numel() for p in model.parameters()) > 0
            built += 1
    return built


@pytest.mark.parametrize("scale", [None, "smoke"])
def test_every_config_resolves_and_builds(data, scale, monkeypatch):
    """Every (suite, dataset, variant, seed) of configs/experiment.yaml, at the papers' scale and at the smoke
    scale: config, network, loss and teacher wiring."""
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(data["plan-weights"]))
    n = build_every_run(REPO / "configs", data, scale)
    suites = Experiment(REPO / "configs").suites
    assert n == sum(len(s["variants"]) * len(s["datasets"]) * len(s["seeds"]) for s in suites.values())


def test_a_broken_variant_yaml_fails_the_resolve_everything_check(data, configs, monkeypatch):
    """The defect this check was written for: sCT's image block named a key the ADM net does not have."""
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(data["plan-weights"]))
    path = configs / "variants" / "sct.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["per_kind"]["image"]["net"] = {"embedding": "positional"}
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"imagenet64/imagenet64/sct/s0: unknown key 'net\.adm\.embedding'"):
        build_every_run(configs, data)


def test_init_student_needs_the_teachers_network(data, configs, monkeypatch):
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(data["plan-weights"]))
    path = configs / "variants" / "cd.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["per_dataset"]["cifar10"]["net"] = {"num_blocks": 2}      # the teacher (edm) keeps 4
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"cifar10/cifar10/cd: init_student needs the teacher's network \(edm\)"):
        Plan.from_snakemake({"suite": "cifar10", "configs": str(configs), "set": [f"dataset.path={data['cifar10']}"]})


def suite_nfes(suite: str) -> dict[str, list[int]]:
    """Each variant of a paper suite → the NFEs it is sampled at (its own config's sample.nfe)."""
    exp = Experiment(REPO / "configs")
    return {v: exp.resolve(suite, suite, v, 0).sample.nfe for v in exp.suite(suite)["variants"]}


@pytest.mark.parametrize("suite", PAPER)
def test_paper_dag_plans_on_the_release_format(data, suite, tmp_path):
    """`snakemake -n --profile slurm all --config suite=S set="dataset.path=DIR"` on a local copy in the real
    format: the teacher and every variant trained, sampled at NFE 1 and 2 (the teacher with Heun), evaluated by
    the three FID backends (and pixel FD on CIFAR-10), the tables and the sample pictures."""
    r = run_snakemake("-n", "--profile", "slurm", "--config", f"suite={suite}", f"results={tmp_path / 'res'}",
                      f"set=dataset.path={data[suite]}", env={"CMBENCH_WEIGHTS": str(data["plan-weights"])})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    nfes, sets = suite_nfes(suite), 4 if suite == "cifar10" else 3
    variants, samples = len(nfes), sum(len(n) for n in nfes.values())
    # references: one per metric set, and on CIFAR-10 (pixel metrics on) the teacher's ODE solution, shared
    assert planned_jobs(r.stdout) == {"all": 1, "train": variants, "sample": samples, "evaluate": samples * sets,
                                      "collect": variants, "reference": sets + (suite == "cifar10"), "report": 1,
                                      "pictures": 1}


def check_smoke_outputs(results: Path, suite: str) -> pd.DataFrame:
    """What a smoke DAG must leave: every variant's FID from all three backends at NFE 1 and 2 (the teacher at its
    Heun NFE) from one sample file each, and summary tables that put each beside the paper's number."""
    df = pd.read_csv(results / "tables" / f"records_{suite}.csv")
    fids = df[df.metric == "fid"]
    teacher_nfe = 35 if suite == "cifar10" else 79
    got = set(zip(fids.variant, fids.nfe, fids.backend + "/" + fids["mode"].fillna("")))
    want = {(v, n, b) for v, vn in suite_nfes(suite).items() for n in vn
            for b in ("torch-fidelity/", "clean-fid/legacy_tensorflow", "clean-fid/clean")}
    assert got == want and ("edm", teacher_nfe) in {(v, n) for v, n, _ in got}
    assert (fids.value > 0).all() and (fids.fid_dims == 64).all() and (fids.n_gen == 8).all()
    assert (fids.conditional == (suite == "imagenet64")).all()
    for (v, n), g in fids.groupby(["variant", "nfe"]):       # one sample file, read by every backend
        assert g.checkpoint_sha256.nunique() == 1, (v, n)
    summary = (results / "tables" / f"summary_{suite}.md").read_text()
    assert "paper" in summary and ("conditional ✓" in summary) == (suite == "imagenet64")
    return df


@pytest.mark.slow
@pytest.mark.parametrize("suite", PAPER)
def test_smoke_dag_on_local_cores(data, suite, tmp_path):
    r = run_snakemake("--cores", "2", "--config", f"suite={suite}", "scale=smoke", f"results={tmp_path}",
                      f"set=dataset.path={data[suite]}", env={"CMBENCH_WEIGHTS": str(data["weights"])})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    df = check_smoke_outputs(tmp_path, suite)
    cfg = yaml.safe_load((tmp_path / "runs" / suite / suite / "sct" / "s0" / "config.json").read_text())["config"]
    assert cfg["train"]["steps"] == 6 and cfg["net"]["model_channels"] == 16       # the smoke scale, recorded
    assert set(df.variant) == set(suite_nfes(suite))


@pytest.mark.slow
def test_smoke_dag_through_slurm(data, tmp_path):
    """The CIFAR-10 smoke DAG through `--profile slurm` on the dev cluster, one Slurm job per run (train, sample,
    every FID backend; `fuse=True`) and one per reference. The split cluster DAG (a job per stage: 95 jobs here,
    7 min on 2 cores) is the same code per stage; CI runs it on the toy suite (test_slurm.py), where it is
    cheap, to keep its time."""
    if shutil.which("sinfo") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        if os.environ.get("CMBENCH_REQUIRE_SLURM") == "1":
            raise RuntimeError("CMBENCH_REQUIRE_SLURM=1 but no Slurm cluster answers")
        pytest.skip("no Slurm cluster (slurm/dev-cluster.sh start)")
    dev = REPO / "configs" / "launch" / "slurm-dev.yaml"
    r = run_snakemake("--profile", "slurm", "--config", "suite=cifar10", "scale=smoke", "fuse=True",
                      f"results={tmp_path}", f"launch_config={dev}", f"set=dataset.path={data['cifar10']}",
                      env={"CMBENCH_WEIGHTS": str(data["weights"])})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_smoke_outputs(tmp_path, "cifar10")
    records = {p.parents[2].name + "/" + p.stem: yaml.safe_load(p.read_text())
               for p in (tmp_path / "runs").glob("cifar10/cifar10/*/s0/jobs/*.json")}
    runs = {k for k in records if k.endswith("/run")}
    n = len(suite_nfes("cifar10"))
    assert len(runs) == n and len(records) == n + 5    # a job per run, per reference (pixels, 3 FIDs, teacher's ODE)
    assert {r["launcher"] for r in records.values()} == {"slurm"}
    ids = ",".join(str(r["job_id"]) for r in records.values())
    states = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ids, "--format=State"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert len(states) == len(records) and set(states) == {"COMPLETED"}, states
