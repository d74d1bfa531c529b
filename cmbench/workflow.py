"""The run table and target lists for the Snakefile. All validation happens here, at `snakemake -n` time."""
from dataclasses import dataclass
from pathlib import Path

from cmbench import paths
from cmbench.config import ConfigError, Experiment, RunConfig, load_launch_config, parse_overrides
from cmbench.launch import LAUNCHERS

DEFAULT_SUITE = "toy"
SNAKEMAKE_KEYS = {"suite", "set", "configs", "results", "launcher", "fuse", "launch_config"}


def check_run(cfg: RunConfig) -> RunConfig:
    """Checks that need the registries (import torch): the loss name and its parameters. Returns the config
    with the loss's defaults filled in, so that the printed config and its hash say everything."""
    from cmbench import losses
    params = losses.build(cfg).params
    return cfg.model_copy(update={"loss": params.model_dump(mode="json")})


@dataclass
class Plan:
    suite: str
    runs: dict[str, RunConfig]       # run dir → resolved config, the suite's runs
    teacher_runs: dict[str, RunConfig]   # teachers outside the suite: trained, not evaluated
    results: str
    configs: str
    overrides: list[str]
    launcher: str
    launch_config: str  # cluster facts per job kind (slurm)
    fuse: bool          # one job per run (train, sample, evaluate); default with the inline launcher

    @classmethod
    def from_snakemake(cls, config: dict) -> "Plan":
        unknown = set(config) - SNAKEMAKE_KEYS
        if unknown:
            raise ConfigError(f"unknown --config key(s) {sorted(unknown)} (known: {sorted(SNAKEMAKE_KEYS)})")
        suite = config.get("suite", DEFAULT_SUITE)
        overrides = config.get("set") or []
        overrides = overrides.split() if isinstance(overrides, str) else list(overrides)
        configs, results = str(config.get("configs", "configs")), str(config.get("results", "results"))
        exp = Experiment(configs)
        s = exp.suite(suite)
        parsed = parse_overrides(overrides)
        runs, teachers = {}, {}
        for dataset in s["datasets"]:
            for variant in s["variants"]:
                for seed in s["seeds"]:
                    cfg = check_run(exp.resolve(suite, dataset, variant, seed, parsed))
                    runs[str(paths.run_dir(results, cfg.run))] = cfg
        for cfg in runs.values():     # a trained teacher is trained (not evaluated) even outside the suite
            if cfg.teacher is not None and cfg.teacher.source == "run":
                t = check_run(exp.resolve(suite, cfg.run.dataset, cfg.teacher.variant, cfg.run.seed, parsed))
                if t.teacher is not None and t.teacher.source == "run":
                    raise ConfigError(f"config {suite}/{cfg.run.dataset}/{t.run.variant}: a teacher run cannot "
                                      f"itself distil a trained run")
                teachers[str(paths.run_dir(results, t.run))] = t
        launcher = str(config.get("launcher", "inline"))
        if launcher not in LAUNCHERS:
            raise ConfigError(f"--config launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}")
        launch_config = str(config.get("launch_config", Path(configs) / "launch" / "slurm.yaml"))
        if launcher == "slurm":
            load_launch_config(launch_config)      # a bad cluster file fails here, before any job
        fuse = config.get("fuse", launcher == "inline")
        if not isinstance(fuse, bool):
            raise ConfigError(f"--config fuse must be True or False, got {fuse!r}")
        return cls(suite, runs, {k: v for k, v in teachers.items() if k not in runs}, results, configs,
                   overrides, launcher, launch_config, fuse)

    # --- targets -------------------------------------------------------------------------------------
    def metric_files(self) -> list[str]:
        return [str(paths.metrics_file(r, n)) for r, cfg in self.runs.items() for n in cfg.sample.nfe]

    def record_files(self) -> list[str]:
        return [str(paths.records_file(r)) for r in self.runs]

    def targets(self) -> list[str]:
        """Every run's artifacts, not only the tables: Snakemake does not re-create a deleted intermediate
        whose consumers are up to date, so a deleted final.pt is re-made only if it is a target itself."""
        runs = [str(paths.final_weights(r)) for r in self.runs]
        if self.fuse:
            return runs + self.record_files() + self.tables()
        samples = [str(paths.samples_file(r, n)) for r, cfg in self.runs.items() for n in cfg.sample.nfe]
        return runs + samples + self.metric_files() + self.record_files() + self.tables()

    def tables(self) -> list[str]:
        t = Path(self.results) / "tables"
        return [str(t / "records.csv"), str(t / f"summary_{self.suite}.md"),
                str(Path(self.results) / "plots" / f"{self.suite}_metrics.png")]

    # --- per-job values (wildcards → run) ---------------------------------------------------------------
    def run(self, w) -> RunConfig:
        key = str(Path(self.results) / "runs" / w.suite / w.dataset / w.variant / f"s{w.seed}")
        return self.runs[key] if key in self.runs else self.teacher_runs[key]

    def teacher_weights(self, w) -> list[str]:
        """The train rule's extra input: a trained teacher's final weights (teacher run → student runs)."""
        cfg = self.run(w)
        if cfg.teacher is None or cfg.teacher.source != "run":
            return []
        return [str(paths.final_weights(paths.sibling_run(paths.run_dir(self.results, cfg.run), cfg.teacher.variant)))]

    def args(self, w) -> str:
        """The run-identifying arguments of `cmbench launch`, as one shell-safe string."""
        return self.launch_args(self.run(w))

    def launch_args(self, cfg: RunConfig) -> str:
        sets = "".join(f" --set '{o}'" for o in self.overrides)
        return (f"--suite {cfg.run.suite} --dataset {cfg.run.dataset} --variant {cfg.run.variant} "
                f"--seed {cfg.run.seed} --configs '{self.configs}' --results '{self.results}'{sets}")

    def launch_env(self) -> dict[str, str]:
        """How jobs are launched travels in the environment, not in rule params: switching between the
        laptop and the cluster must not re-run finished work (Snakemake re-runs a job whose params change)."""
        return {"CMBENCH_LAUNCHER": self.launcher, "CMBENCH_LAUNCH_CONFIG": self.launch_config}

    def reference(self, w) -> str:
        from cmbench.metrics.evaluate import reference_path
        return str(reference_path(self.run(w), int(w.nfe), self.results))

    def references(self, w) -> list[str]:
        """The cached ground truth of every NFE of a run (the fused job's input)."""
        from cmbench.metrics.evaluate import reference_path
        cfg = self.run(w)
        return sorted({str(reference_path(cfg, n, self.results)) for n in cfg.sample.nfe})

    def metric_inputs(self, w) -> list[str]:
        cfg, rdir = self.run(w), paths.run_dir(self.results, self.run(w).run)
        return [str(paths.metrics_file(rdir, n)) for n in cfg.sample.nfe]

    def reference_sources(self) -> dict[str, tuple[RunConfig, int]]:
        """Cached ground-truth file → a (run, NFE) that defines it (runs sharing a key share the file)."""
        from cmbench.metrics.evaluate import reference_path
        out = {}
        for cfg in self.runs.values():
            for n in cfg.sample.nfe:
                out.setdefault(str(reference_path(cfg, n, self.results)), (cfg, n))
        return out

    def reference_args(self, output: str) -> str:
        cfg, nfe = self.reference_sources()[output]
        return f"{self.launch_args(cfg)} --nfe {nfe}"
