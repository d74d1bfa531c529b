"""The `cmbench` command."""
import argparse
import os
import sys

import yaml


def _config_args(p: argparse.ArgumentParser) -> None:
    """Which run to resolve from configs/: what planning does (the stages take the run directory instead)."""
    p.add_argument("--suite", default="toy")
    p.add_argument("--dataset", required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--scale", default=None, help="configs/scales/<SCALE>.yaml (e.g. smoke: the paper suites' "
                   "code paths at tiny sizes; default: the papers' sizes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (YAML value); repeatable")
    p.add_argument("--configs", default="configs", help="config directory (default: %(default)s)")


def _run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="run directory (its config.json, written by planning or by "
                   "`cmbench resolve --write`, is all a stage reads)")


def cmd_resolve(a):
    from cmbench.checks import resolve_run
    from cmbench.config import Experiment, parse_overrides, write_run_config
    exp = Experiment(a.configs)
    exp.suite(a.suite)         # a suite of experiment.yaml (its name becomes part of the run dir)
    cfg = resolve_run(exp, a.suite, a.dataset, a.variant, a.seed, parse_overrides(a.set), a.scale)
    if a.write is not None:
        from cmbench import paths
        rdir = paths.run_dir(a.write, cfg.run)
        write_run_config(cfg, rdir)
        print(rdir)
        return
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    print(f"# hash: {cfg.hash}")


def cmd_train(a):
    from cmbench.config import load_run_config
    from cmbench.train.loop import train
    print(train(load_run_config(a.run), a.run))


def cmd_sample(a):
    from cmbench.sample import sample_run
    shard, _, shards = a.shard.partition("/")
    print(sample_run(a.run, a.nfe, a.out, int(shard), int(shards)))


def cmd_evaluate(a):
    from cmbench import paths
    from cmbench.metrics.evaluate import evaluate_run
    print(evaluate_run(a.run, a.nfe, a.results or paths.results_of(a.run), a.metric))


def cmd_launch(a):
    from cmbench.config import load_launch_config
    from cmbench.launch import RUN_STAGES, launch
    if a.stage not in RUN_STAGES and a.nfe is None:
        sys.exit(f"cmbench: error: launch {a.stage} needs --nfe")
    launch_cfg = load_launch_config(a.launch_config) if a.launcher == "slurm" else None
    launch(a.stage, a.run, a.nfe, a.launcher, launch_cfg, a.metric)


def cmd_report(a):
    from cmbench.config import check_name
    from cmbench.report import report
    check_name("suite", a.suite)      # part of the output file names
    for path in report(a.suite, a.records, a.tables, a.plots, a.paper_numbers):
        print(path)


def cmd_settings(a):
    from cmbench.settings import settings_table
    print(settings_table(a.suite, a.configs, a.paper_settings, a.scale))


def cmd_status(a):
    from cmbench.status import as_json, suite_status, table
    rows = suite_status(a.suite, a.configs, a.results, a.scale, a.set)
    print(as_json(rows) if a.json else table(rows))


def parser() -> argparse.ArgumentParser:
    from cmbench.config import LAUNCHERS
    from cmbench.launch import STAGES

    ap = argparse.ArgumentParser(prog="cmbench", description="consistency-model benchmark harness")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("resolve", help="print a run's merged, validated config and its hash (--write: plan the "
                       "run, i.e. write RESULTS/runs/.../config.json)")
    _config_args(p)
    p.add_argument("--write", metavar="RESULTS", default=None, help="write the run's config.json under this results "
                   "directory and print the run directory")
    p.set_defaults(func=cmd_resolve)
    p = sub.add_parser("train", help="train one run in this process (resumes; no-op when finished)")
    _run_arg(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("launch", help="run a stage of one run through a launcher and wait for it")
    p.add_argument("stage", choices=sorted(STAGES))
    _run_arg(p)
    p.add_argument("--nfe", type=int)
    p.add_argument("--metric", default="data", help="evaluate/reference: the metric set, 'data' or an FID "
                   "backend in evaluate.fid (default: %(default)s)")
    p.add_argument("--launcher", choices=LAUNCHERS, default=os.environ.get("CMBENCH_LAUNCHER", "inline"),
                   help="default: $CMBENCH_LAUNCHER, else %(default)s")
    p.add_argument("--launch-config", default=os.environ.get("CMBENCH_LAUNCH_CONFIG", "configs/launch/slurm.yaml"),
                   help="cluster resources per job kind, for --launcher slurm (default: %(default)s)")
    p.set_defaults(func=cmd_launch)
    p = sub.add_parser("sample", help="sample a finished run to an npz (samples, seeds, x_T, σ list)")
    _run_arg(p)
    p.add_argument("--nfe", type=int, required=True)
    p.add_argument("--out", default=None, help="output npz (default: RUN/samples/nfeK.npz)")
    p.add_argument("--shard", default="0/1", metavar="I/K", help="sample block I of K of the seeds (default: all)")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("evaluate", help="metric records for a run's samples at one NFE")
    _run_arg(p)
    p.add_argument("--nfe", type=int, required=True)
    p.add_argument("--results", default=None, help="where cached references live (default: the results tree of "
                   "--run)")
    p.add_argument("--metric", default="data", help="'data' or an FID backend in evaluate.fid (default: %(default)s)")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("report", help="collate metric records into tables and plots")
    p.add_argument("--suite", required=True)
    p.add_argument("--records", nargs="+", required=True, help="metric record files (JSON)")
    p.add_argument("--tables", default="results/tables")
    p.add_argument("--plots", default="results/plots")
    p.add_argument("--paper-numbers", default=None,
                   help="reported numbers (default: configs/paper_numbers.yaml; needed for cifar10/imagenet64)")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("settings", help="a paper suite's resolved settings beside the papers' values and sources "
                       "(✓ / ✗ / unverified)")
    p.add_argument("--suite", required=True)
    p.add_argument("--scale", default=None, help="configs/scales/<SCALE>.yaml (default: the papers' sizes)")
    p.add_argument("--configs", default="configs", help="config directory (default: %(default)s)")
    p.add_argument("--paper-settings", default=None,
                   help="the papers' values (default: CONFIGS/paper_settings.yaml)")
    p.set_defaults(func=cmd_settings)
    p = sub.add_parser("status", help="one line per run of a suite: stage, step / total, steps per second, ETA, "
                       "last logged loss, Slurm job and state (reads the run dirs and sacct; changes nothing)")
    p.add_argument("--suite", default="toy")
    p.add_argument("--scale", default=None, help="configs/scales/<SCALE>.yaml, as the workflow was run with")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="an override the workflow was run with (only for runs not planned yet); repeatable")
    p.add_argument("--configs", default="configs", help="config directory (default: %(default)s)")
    p.add_argument("--results", default=None, help="results directory (default: the workflow's, results or "
                   "results/scale-SCALE)")
    p.add_argument("--json", action="store_true", help="the rows as JSON")
    p.set_defaults(func=cmd_status)
    return ap


def main(argv=None) -> None:
    from cmbench.config import ConfigError
    from cmbench.errors import (DamagedFile, JobFailed, MissingWeights, RunDirInUse, TrainingDiverged,
                                UnverifiedWeights)

    a = parser().parse_args(argv)
    try:
        a.func(a)
    except (ConfigError, TrainingDiverged, JobFailed, MissingWeights, UnverifiedWeights, DamagedFile,
            RunDirInUse) as e:
        sys.exit(f"cmbench: error: {e}")


if __name__ == "__main__":
    main()
