"""The cluster path without a cluster: cluster facts per suite, sbatch's refusals, ranks of a multi-node job.
(The same path on the dev cluster: tests/test_slurm.py.)"""
import os
import signal
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from submitit.core.utils import FailedJobError

from cmbench import paths
from cmbench.config import ConfigError, load_launch_config, write_run_config
from cmbench.launch import StageJob, _rejected, _slurm_parameters
from cmbench.train import loop
from conftest import REPO
from test_distributed import assert_same_run, config

DEFAULT = REPO / "configs" / "launch" / "slurm.yaml"
KINDS = ("teacher", "train", "sample", "evaluate")


def test_default_cluster_facts_give_toy_and_digits_one_cpu_and_the_paper_suites_gpus():
    facts = load_launch_config(DEFAULT)
    for suite in ("toy", "digits"):          # runs anywhere, GPUs or not, and holds no GPU for a 2-minute MLP
        for kind in KINDS:
            job = facts.job(suite, kind)
            assert (job.gpus_per_node, job.cpus_per_task, job.nodes) == (0, 1, 1), (suite, kind)
            assert job.timeout_min <= 120
            assert _slurm_parameters(job, kind)["gpus_per_node"] == 0
    assert facts.job("cifar10", "train").gpus_per_node == 8
    imagenet = _slurm_parameters(facts.job("imagenet64", "train"), "train")
    assert (imagenet["nodes"], imagenet["tasks_per_node"], imagenet["gpus_per_node"]) == (8, 8, 8)   # 64 GPUs
    assert _slurm_parameters(facts.job("imagenet64", "evaluate"), "evaluate")["nodes"] == 1


def test_a_suite_entry_changes_only_its_own_keys(tmp_path):
    data = yaml.safe_load(DEFAULT.read_text())
    data["suites"] = {"mine": {"train": {"timeout_min": 5}}, "bare": None}
    path = tmp_path / "facts.yaml"
    path.write_text(yaml.safe_dump(data))
    facts = load_launch_config(path)
    assert facts.job("mine", "train") == facts.jobs["train"].model_copy(update={"timeout_min": 5})
    assert all(facts.job("mine", k) == facts.jobs[k] for k in ("teacher", "sample", "evaluate"))
    assert all(facts.job("bare", k) == facts.jobs[k] for k in KINDS)


@pytest.mark.parametrize("suites, named", [({"toy": {"trian": {"nodes": 2}}}, "suites.toy.trian"),
                                           ({"toy": {"train": {"nodes": 0}}}, "suites.toy.train.nodes"),
                                           ({"toy": {"train": {"gpus": 1}}}, "suites.toy.train.gpus")])
def test_a_bad_suite_entry_is_one_line_naming_its_key(tmp_path, suites, named):
    path = tmp_path / "facts.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(DEFAULT.read_text()), "suites": suites}))
    with pytest.raises(ConfigError) as e:
        load_launch_config(path)
    assert named in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_misspelt_suite_in_the_cluster_facts_stops_the_plan(tmp_path):
    from cmbench.workflow import Plan
    path = tmp_path / "facts.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(DEFAULT.read_text()), "suites": {"cifr10": {"train": {"nodes": 2}}}}))
    with pytest.raises(ConfigError, match="suites.cifr10 is not a suite of .*known: cifar10") as e:
        Plan.from_snakemake({"configs": str(REPO / "configs"), "launcher": "slurm", "launch_config": str(path)})
    assert "\n" not in str(e.value)


def test_a_job_kind_missing_from_the_cluster_facts_is_named(tmp_path):
    data = yaml.safe_load(DEFAULT.read_text())
    del data["jobs"]["sample"]
    path = tmp_path / "facts.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="jobs: no entry for sample"):
        load_launch_config(path)


@pytest.mark.parametrize("stderr, option", [
    ("sbatch: error: Invalid generic resource (gres) specification", "gpus_per_node=8"),
    ("sbatch: error: Memory specification can not be satisfied\nsbatch: error: Batch job submission failed: "
     "Requested node configuration is not available", "mem_gb=256.0"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     "account='nobody'"),
    ("sbatch: error: invalid partition specified: gpu", "partition='gpu'")])
def test_an_sbatch_rejection_is_one_line_naming_the_job_kind_and_the_option(stderr, option):
    job = load_launch_config(DEFAULT).job("cifar10", "train").model_copy(update={"account": "nobody",
                                                                                 "partition": "gpu"})
    msg = str(_rejected(FailedJobError(stderr), "train", "cifar10", job))
    assert "\n" not in msg and msg.startswith("sbatch rejected the train job of suite cifar10: ")
    assert stderr.splitlines()[0].removeprefix("sbatch: error: ") in msg and f"fix {option} of" in msg


def rank_of_two_nodes(rank: int, env: dict, rdir: str) -> None:
    """One task of a two-node, one-task-per-node Slurm allocation, as srun starts it: only SLURM_* variables."""
    os.environ.update({**env, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank), "SLURM_LOCALID": "0"})
    StageJob()("train", rdir, None)
    assert (dist.get_rank(), dist.get_world_size()) == (rank, 2)       # one process group over both "nodes"
    assert (os.environ["MASTER_ADDR"], os.environ["LOCAL_RANK"]) == ("localhost", "0")


def two_node_env(job_id: int) -> dict:
    return {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": str(job_id), "SLURM_NTASKS": "2",
            "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": f"localhost,{socket.gethostname()}"}


def free_rendezvous(monkeypatch) -> dict:
    """The environment of a job whose rendezvous port (submitit derives it from the job id) is free here."""
    from submitit.helpers import TorchDistributedEnvironment
    for job_id in range(4242, 4342):
        with monkeypatch.context() as m:
            for k, v in {**two_node_env(job_id), "SLURM_PROCID": "0"}.items():
                m.setenv(k, v)
            m.delenv("MASTER_PORT", raising=False)
            dist_env = TorchDistributedEnvironment()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", dist_env.master_port))
            except OSError:
                continue
        assert dist_env.master_addr == "localhost" and dist_env.world_size == 2
        return two_node_env(job_id)
    raise AssertionError("no free port")


def test_a_two_node_training_job_takes_its_ranks_from_slurm_and_matches_one_rank(tmp_path, monkeypatch):
    cfg = config()
    single = paths.run_dir(tmp_path / "one", cfg.run)
    loop.train(cfg, single, progress=False)
    two = config(per_device=16)
    rdir = paths.run_dir(tmp_path / "two", two.run)
    write_run_config(two, rdir)                   # planned, as the workflow does before its jobs
    env = free_rendezvous(monkeypatch)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)      # what submitit exports must come from the SLURM_* variables
    mp.spawn(rank_of_two_nodes, args=(env, str(rdir)), nprocs=2, join=True)
    assert_same_run(single, rdir)


def test_the_preemption_signal_mid_step_checkpoints_that_step_before_submitit_requeues(tmp_path, monkeypatch, capsys):
    """The signal comes inside step 200; submitit's handler (here a stand-in that exits, as submitit's does after
    requeueing) must find the state after step 200 saved, and the resumed run must end bit-identical."""
    from cmbench import checkpoint
    from cmbench.checks import check_run
    from cmbench.config import Experiment
    from cmbench.launch import _train

    over = {"train": {"steps": 500, "checkpoint_every": 100000}}
    cfg = check_run(Experiment(REPO / "configs").resolve("toy", "gauss1d", "ict", 0, over))
    rdir = paths.run_dir(tmp_path / "preempted", cfg.run)
    write_run_config(cfg, rdir)
    gradients = loop.Trainer.gradients

    def signalled_in_step_200(self, step, *args):
        if step == 200:
            os.kill(os.getpid(), signal.SIGUSR2)          # handled at the next bytecode: mid-step
        return gradients(self, step, *args)

    found = []

    def submitit_handler(signum, frame):
        found.append([p.name for p in paths.checkpoints_dir(rdir).iterdir()])
        raise SystemExit(-1)

    monkeypatch.setattr(loop.Trainer, "gradients", signalled_in_step_200)
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(SystemExit):
            _train(rdir, None, None)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert found == [["ckpt-000000201.pt"]]
    assert "preemption signal during step 200: checkpointed the state after 201 steps" in capsys.readouterr().err
    monkeypatch.undo()
    resumed = loop.train(cfg, rdir, progress=False)                    # the requeued job
    whole = loop.train(cfg, paths.run_dir(tmp_path / "whole", cfg.run), progress=False)
    a, b = checkpoint.load(resumed), checkpoint.load(whole)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
