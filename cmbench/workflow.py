"""The run table and target lists for the Snakefile. All validation happens here, at `snakemake -n` time: every
run's config is resolved once and checked; before the first job the Snakefile writes each to RUN/config.json,
the one address of a run, and no stage reads configs/ again. Imports neither pandas nor submitit."""
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from cmbench import paths
from cmbench.checks import check_init, resolve_run
from cmbench.config import (LAUNCHERS, ConfigError, Experiment, LaunchConfig, RunConfig, check_name,
                            load_launch_config, parse_overrides, write_run_config)

# the run-directory pattern of the Snakefile's rules: paths.run_dir with wildcards for its parts
WILDCARDS = SimpleNamespace(suite="{suite}", dataset="{dataset}", variant="{variant}", seed="{seed}")

DEFAULT_SUITE = "toy"
SNAKEMAKE_KEYS = {"suite", "scale", "set", "configs", "results", "launcher", "fuse", "launch_config"}


@dataclass
class Plan:
    suite: str
    runs: dict[str, RunConfig]       # run dir → resolved config, the suite's runs
    teacher_runs: dict[str, RunConfig]   # teachers outside the suite: trained, not evaluated
    results: str
    configs: str
    launcher: str
    launch_config: str  # cluster facts per job kind (slurm)
    fuse: bool          # one job per run (train, sample, evaluate); default with the inline launcher
    scale: str | None = None   # configs/scales/<scale>.yaml (e.g. smoke), or the papers' sizes
    _references: dict | None = None

    @property
    def run_pattern(self) -> Path:
        return paths.run_dir(self.results, WILDCARDS)

    @classmethod
    def from_snakemake(cls, config: dict) -> "Plan":
        unknown = set(config) - SNAKEMAKE_KEYS
        if unknown:
            raise ConfigError(f"unknown --config key(s) {sorted(unknown)} (known: {sorted(SNAKEMAKE_KEYS)})")
        suite = config.get("suite", DEFAULT_SUITE)
        scale = config.get("scale")
        if scale is not None:
            scale = check_name("scale", scale)
        overrides = config.get("set") or []
        # a scaled suite gets its own results tree, so that it never mixes with (or sets aside) the full runs
        configs = str(config.get("configs", "configs"))
        results = str(config.get("results", "results" if scale is None else f"results/scale-{scale}"))
        for key, path in (("configs", configs), ("results", results)):
            if "{" in path or "}" in path:     # Snakemake would read them as wildcards of every file pattern
                raise ConfigError(f"--config {key}={path!r}: a path with braces is not supported (rename it)")
        exp = Experiment(configs)
        s = exp.suite(suite)
        parsed = parse_overrides(overrides)
        runs, teachers = {}, {}
        for dataset in s["datasets"]:
            for variant in s["variants"]:
                for seed in s["seeds"]:
                    cfg = resolve_run(exp, suite, dataset, variant, seed, parsed, scale)
                    runs[str(paths.run_dir(results, cfg.run))] = cfg
        pending = list(runs.values())    # a trained teacher (and its own) is trained even outside the suite
        while pending:
            cfg = pending.pop()
            if cfg.teacher is not None and cfg.teacher.source == "run":
                t = resolve_run(exp, suite, cfg.run.dataset, cfg.teacher.variant, cfg.run.seed, parsed, scale)
                if cfg.teacher.init_student:
                    check_init(cfg, t)
                key = str(paths.run_dir(results, t.run))
                if key not in teachers:
                    teachers[key] = t
                    pending.append(t)
        launcher = str(config.get("launcher", "inline"))
        if launcher not in LAUNCHERS:
            raise ConfigError(f"--config launcher={launcher!r} is not one of {', '.join(LAUNCHERS)}")
        launch_config = str(config.get("launch_config", Path(configs) / "launch" / "slurm.yaml"))
        if launcher == "slurm":
            launch_cfg = load_launch_config(launch_config)      # a bad cluster file fails here, before any job
            unknown = sorted(set(launch_cfg.suites) - set(exp.suites))    # a misspelt suite would be silently unused
            if unknown:
                raise ConfigError(f"{launch_config}: suites.{unknown[0]} is not a suite of {exp.root}/experiment.yaml "
                                  f"(known: {', '.join(sorted(exp.suites))})")
            for cfg in [*runs.values(), *teachers.values()]:
                check_ranks(cfg, launch_cfg, launch_config)
        fuse = config.get("fuse", launcher == "inline")
        if not isinstance(fuse, bool):
            raise ConfigError(f"--config fuse must be True or False, got {fuse!r}")
        plan = cls(suite, runs, {k: v for k, v in teachers.items() if k not in runs}, results, configs,
                   launcher, launch_config, fuse, scale)
        plan.reference_sources()      # FID reference keys hash the Inception weights: a missing file fails here
        from cmbench.report import load_paper_numbers
        load_paper_numbers(plan.paper_numbers())    # the report's input: a bad entry fails here, not in the last job
        return plan

    def write_configs(self) -> None:
        """RUN/config.json of every planned run (suite and teacher runs): the config its stages read, as resolved
        now (cmbench.config.write_run_config: an unchanged file is left alone)."""
        for rdir, cfg in {**self.runs, **self.teacher_runs}.items():
            write_run_config(cfg, rdir)

    # --- targets -------------------------------------------------------------------------------------
    def metric_files(self) -> list[str]:
        return [str(paths.metrics_file(r, n, m)) for r, cfg in self.runs.items() for n in cfg.sample.nfe
                for m in cfg.metric_sets()]

    def record_files(self) -> list[str]:
        return [str(paths.records_file(r)) for r in self.runs]

    def targets(self) -> list[str]:
        """Every run's artifacts, not only the tables: Snakemake does not re-create a deleted intermediate
        whose consumers are up to date, so a deleted final.pt is re-made only if it is a target itself."""
        runs = [str(paths.final_weights(r)) for r in self.runs] + self.studies()
        if self.fuse:
            return runs + self.record_files() + self.tables() + self.pictures()
        samples = [str(paths.samples_file(r, n)) for r, cfg in self.runs.items() for n in cfg.sample.nfe]
        return runs + samples + self.metric_files() + self.record_files() + self.tables() + self.pictures()

    def studies(self) -> list[str]:
        """The theory study (Li, Huang & Wei 2024 on exact Gaussian CT; cmbench.studies.theory), made with the
        toy suite: it needs no trained run."""
        if self.suite != DEFAULT_SUITE:
            return []
        out = Path(self.results) / "studies" / "theory"
        return [str(out / f) for f in ("theory.csv", "theory_slopes.csv", "theory_summary.md",
                                       "theory_summary.tex", "theory.png")]

    def tables(self) -> list[str]:
        from cmbench.report import report_outputs
        return [str(p) for p in report_outputs(self.suite, Path(self.results) / "tables", Path(self.results) / "plots")]

    def picture_runs(self) -> list[str]:
        """The runs the sample pictures show: each dataset × variant at the suite's first seed."""
        first = {}
        for rdir, cfg in self.runs.items():
            first.setdefault((cfg.run.dataset, cfg.run.variant), rdir)
        return list(first.values())

    def picture_kinds(self) -> dict[str, str]:
        """dataset → how its samples are drawn (cmbench.report.outputs.picture_kind)."""
        from cmbench.report.outputs import picture_kind
        return {cfg.run.dataset: picture_kind(cfg.dataset) for cfg in self.runs.values()}

    def pictures(self) -> list[str]:
        from cmbench.report.outputs import picture_files
        plots = Path(self.results) / "plots"
        return [str(p) for d in self.picture_kinds() for p in picture_files(plots, self.suite, d)]

    def picture_inputs(self) -> list[str]:
        """What the pictures read: the shown runs' samples (a fused run's samples folder, an output of its one
        job) and, for toy data, the cached exact endpoints of each NFE."""
        from cmbench.metrics.evaluate import is_image, reference_path
        out = []
        for rdir in self.picture_runs():
            cfg = self.runs[rdir]
            out += ([samples_dir(rdir)] if self.fuse else [str(paths.samples_file(rdir, n)) for n in cfg.sample.nfe])
            out += [] if is_image(cfg) else [str(reference_path(cfg, n, self.results)) for n in cfg.sample.nfe]
        return list(dict.fromkeys(out))

    def paper_numbers(self) -> str:
        return str(Path(self.configs) / "paper_numbers.yaml")

    # --- per-job values (wildcards → run) ---------------------------------------------------------------
    def run_dir(self, w) -> Path:
        return paths.run_dir(self.results, w)

    def run(self, w) -> RunConfig:
        key = str(self.run_dir(w))
        return self.runs[key] if key in self.runs else self.teacher_runs[key]

    def teacher_weights(self, w) -> list[str]:
        """The train rule's extra input: a trained teacher's final weights (teacher run → student runs)."""
        cfg = self.run(w)
        if cfg.teacher is None or cfg.teacher.source != "run":
            return []
        return [str(paths.final_weights(paths.sibling_run(self.run_dir(w), cfg.teacher.variant)))]

    def args(self, w) -> list[str]:
        """The arguments of `cmbench launch` that name the run (the rules quote each: `{params.args:q}`)."""
        return ["--run", str(self.run_dir(w))]

    def launch_env(self) -> dict[str, str]:
        """How jobs are launched travels in the environment, not in rule params: switching between the
        laptop and the cluster must not re-run finished work (Snakemake re-runs a job whose params change)."""
        return {"CMBENCH_LAUNCHER": self.launcher, "CMBENCH_LAUNCH_CONFIG": self.launch_config}

    def sample_hash(self, w) -> str:
        """The sampling settings a job's samples depend on (RunConfig.sample_hash): its NFE's (sample, evaluate),
        or every NFE's (the fused run, where a new or changed NFE re-runs the job)."""
        cfg = self.run(w)
        return " ".join(cfg.sample_hash(n) for n in ([int(w.nfe)] if hasattr(w, "nfe") else cfg.sample.nfe))

    def evaluate_every(self, w) -> int | None:
        """The train, sample and evaluate jobs' parameter: a changed evaluate.every re-runs them; training then
        redoes the steps after the newest checkpoint before the first snapshot it lacks (bit-identical weights),
        none when it has them all (cmbench.train.loop)."""
        return self.run(w).evaluate.every

    def metric_set(self, w) -> str:
        """The metric set named by a file-name wildcard (cmbench.paths.slug)."""
        return {paths.slug(m): m for m in self.run(w).metric_sets()}[w.metric]

    def reference(self, w) -> list[str]:
        """The cached references one evaluation job reads (evaluate.reference_sets)."""
        from cmbench.metrics.evaluate import reference_path, reference_sets
        cfg, nfe = self.run(w), int(w.nfe)
        return [str(reference_path(cfg, nfe, self.results, s)) for s in reference_sets(cfg, nfe, self.metric_set(w))]

    def references(self, w) -> list[str]:
        """The cached ground truth / reference statistics of every NFE and metric set of a run (the fused
        job's input)."""
        from cmbench.metrics.evaluate import reference_path, reference_sets
        cfg = self.run(w)
        return sorted({str(reference_path(cfg, n, self.results, s)) for n in cfg.sample.nfe
                       for m in cfg.metric_sets() for s in reference_sets(cfg, n, m)})

    def metric_inputs(self, w) -> list[str]:
        cfg, rdir = self.run(w), self.run_dir(w)
        return [str(paths.metrics_file(rdir, n, m)) for n in cfg.sample.nfe for m in cfg.metric_sets()]

    def reference_sources(self) -> dict[str, tuple[Path, int, str]]:
        """Cached reference file → a (run dir, NFE, metric set) that defines it (runs sharing a key share it)."""
        from cmbench.metrics.evaluate import reference_path, reference_sets
        if self._references is None:
            self._references = {}
            # a fused teacher run is evaluated too: one with a trained teacher of its own (TCM's stage 1) may need an
            # ODE reference that no suite run shares
            for rdir, cfg in {**self.runs, **self.teacher_runs}.items():
                for n in cfg.sample.nfe:
                    for s in dict.fromkeys(s for m in cfg.metric_sets() for s in reference_sets(cfg, n, m)):
                        self._references.setdefault(str(reference_path(cfg, n, self.results, s)), (Path(rdir), n, s))
        return self._references

    def reference_inputs(self, w) -> list[str]:
        """The reference job's input: the teacher weights that a teacher's ODE solution is solved with."""
        from cmbench.metrics import ode_ref
        rdir, _, s = self.reference_sources()[str(Path(self.results) / "reference" / f"{w.name}.npz")]
        cfg = {**self.runs, **self.teacher_runs}[str(rdir)]
        return [str(ode_ref.teacher_weights(cfg, self.results))] if s == ode_ref.REFERENCE else []

    def reference_args(self, output: str) -> list[str]:
        rdir, nfe, metric = self.reference_sources()[output]
        return ["--run", str(rdir), "--nfe", str(nfe), "--metric", metric]


def samples_dir(rdir: str | Path) -> str:
    """The folder of a run's sample files (cmbench.paths.samples_file, any NFE)."""
    return str(paths.samples_file(rdir, 0).parent)


def check_ranks(cfg: RunConfig, launch_cfg: LaunchConfig, launch_config: str) -> None:
    """The global batch of a Slurm training job must split into its ranks × micro-batches of
    train.batch_per_device: checked while planning, not when the job starts (cmbench.train.loop.micro_batches)."""
    from cmbench.launch import _slurm_parameters, job_kind      # imports submitit: only for the slurm launcher
    from cmbench.train.loop import micro_batches
    kind = job_kind("train", cfg)
    job = _slurm_parameters(launch_cfg.job(cfg.run.suite, kind), kind)
    ranks = job["tasks_per_node"] * job["nodes"]
    try:
        micro_batches(cfg.train.batch, cfg.train.batch_per_device, 0, ranks)
    except ConfigError as e:
        raise ConfigError(f"config {cfg.run.suite}/{cfg.run.dataset}/{cfg.run.variant}/s{cfg.run.seed}: {e} "
                          f"(the {ranks} rank(s) of a {kind} job of suite {cfg.run.suite} in {launch_config})") from None
