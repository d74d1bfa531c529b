# cmbench workflow: train → sample (per NFE) → evaluate → records per run → tables. Logic lives in
# cmbench.workflow; every config is resolved and validated while this file is parsed, before any job starts.
# Every value a shell line takes is quoted ({x:q}, shlex.quote): no path or config value can run a command.
#   snakemake --cores 2 all                              # the toy suite, one job per run (fused stages)
#   snakemake --cores 2 all --config suite=NAME set="train.steps=2000 sample.n=5000" fuse=False
import os
import sys

from cmbench import paths
from cmbench.config import ConfigError
from cmbench.errors import MissingWeights, UnverifiedWeights
from cmbench.report.outputs import picture_files
from cmbench.workflow import Plan, samples_dir

try:
    P = Plan.from_snakemake(config)
except (ConfigError, MissingWeights, UnverifiedWeights) as e:   # before any job: a bad config, or FID without its
    # official weights
    sys.exit(f"cmbench: config error: {e}")
os.environ.update(P.launch_env())


# Before the first job (not on a dry run): every run's config as planned now goes to RUN/config.json, the one
# file its stages read (rewritten only where the config changed; the rules' hashes re-run what changed).
onstart:
    P.write_configs()

# a run's files, as cmbench.paths lays them out, with wildcards for the run's parts, its NFE and metric set
RUN = P.run_pattern
FINAL, RECORDS = str(paths.final_weights(RUN)), str(paths.records_file(RUN))
SAMPLES, METRICS = str(paths.samples_file(RUN, "{nfe}")), str(paths.metrics_file(RUN, "{nfe}", "{metric}"))
LOGS = paths.logs_dir(RUN)

# The HTML report, `snakemake --report results/report.html` (same --config as the run; it runs no job): the
# CSV tables and PNG plots of SHOWN, each with its caption from report/ (the Markdown and LaTeX copies stay
# plain outputs). A CSV or PNG output missing from SHOWN stops the workflow while this file is parsed.
report: "report/workflow.rst"

BENCH, ODE, THEORY = f"Benchmark ({P.suite} suite)", "ODE error vs quality", "Theory study"
BUDGET = "Quality against training budget"
SHOWN = {  # output file name → (category, subcategory, caption file in report/)
    f"summary_{P.suite}.csv": (BENCH, "Tables", "summary.rst"),
    f"records_{P.suite}.csv": (BENCH, "Tables", "records.rst"),
    f"{P.suite}_metrics.png": (BENCH, "Plots", "metrics.rst"),
    f"{P.suite}_training.png": (BENCH, "Plots", "training.rst"),
    f"{P.suite}_fid_agreement.png": (BENCH, "Plots", "fid_agreement.rst"),
    f"budget_{P.suite}.csv": (BUDGET, "Tables", "budget.rst"),
    f"images_to_reach_{P.suite}.csv": (BUDGET, "Tables", "images_to_reach.rst"),
    f"{P.suite}_budget_images.png": (BUDGET, "Plots", "budget_plot.rst"),
    f"{P.suite}_budget_flops.png": (BUDGET, "Plots", "budget_plot.rst"),
    f"ode_vs_quality_{P.suite}.csv": (ODE, "Tables", "ode_vs_quality.rst"),
    f"ode_vs_quality_verdicts_{P.suite}.csv": (ODE, "Tables", "ode_vs_quality_verdicts.rst"),
    f"{P.suite}_ode_vs_quality.png": (ODE, "Plots", "ode_vs_quality_plot.rst"),
    "theory.csv": (THEORY, "Tables", "theory.rst"),
    "theory_slopes.csv": (THEORY, "Tables", "theory_slopes.rst"),
    "theory.png": (THEORY, "Plots", "theory_plot.rst"),
    **{picture_files("", P.suite, d)[0].name: (f"Samples ({P.suite} suite)", d, f"samples_{kind}.rst")
       for d, kind in P.picture_kinds().items()},
}


def shown(files):
    """files, with the CSV and PNG ones flagged for the HTML report as SHOWN says."""
    def flag(f):
        name = os.path.basename(f)
        if not name.endswith((".csv", ".png")):
            return f
        if name not in SHOWN:
            sys.exit(f"cmbench: Snakefile: output {name} has no entry in SHOWN (the HTML report)")
        category, subcategory, caption = SHOWN[name]
        return report(f, caption=f"report/{caption}", category=category, subcategory=subcategory)
    return [flag(f) for f in files]

wildcard_constraints:
    suite="[A-Za-z0-9_-]+",
    dataset="[A-Za-z0-9_-]+",
    variant="[A-Za-z0-9_-]+",
    seed=r"\d+",
    nfe=r"\d+",
    metric="[A-Za-z0-9_-]+",


rule all:
    input:
        P.targets(),


rule reference:
    input:
        P.reference_inputs,   # a teacher's ODE solution: the teacher's weights
    output:
        f"{P.results}/reference/{{name}}.npz",
    params:
        args=lambda w, output: P.reference_args(output[0]),
    resources:
        cluster_jobs=1,   # a queued job (capped by the slurm profile)
    log:
        f"{P.results}/reference/logs/{{name}}.log",
    shell:
        "cmbench launch reference {params.args:q} > {log:q} 2>&1"


if P.fuse:

    # One process trains, samples and evaluates a run: on a laptop, process start-up costs more than a toy
    # run's sampling and evaluation (a teacher run outside the suite is evaluated too: it is cheap).
    rule run:
        input:
            P.teacher_weights,
            P.references,
        output:
            FINAL,
            RECORDS,
            directory(samples_dir(RUN)),   # every NFE's samples, kept: the pictures read them
        params:
            # a changed training re-runs the job; changed sampling too, but then it does not train (final.pt is
            # rebuilt from the last checkpoint); changed evaluation settings change the references (inputs)
            config_hash=lambda w: P.run(w).hash,
            sample_hash=P.sample_hash,
            evaluate_every=P.evaluate_every,
            args=P.args,
        threads: lambda w: P.run(w).train.threads
        resources:
            cluster_jobs=1,   # a queued job (capped by the slurm profile)
        log:
            f"{LOGS}/run.log",
        shell:
            "cmbench launch run {params.args:q} > {log:q} 2>&1"

else:

    rule train:
        input:
            P.teacher_weights,
        output:
            FINAL,
        params:
            config_hash=lambda w: P.run(w).hash,   # a changed training re-runs the job (sampling does not)
            evaluate_every=P.evaluate_every,
            args=P.args,
        threads: lambda w: P.run(w).train.threads
        resources:
            cluster_jobs=1,   # a queued job (capped by the slurm profile)
        log:
            f"{LOGS}/train.log",
        shell:
            "cmbench launch train {params.args:q} > {log:q} 2>&1"

    rule sample:
        input:
            FINAL,
        output:
            SAMPLES,
        params:
            sample_hash=P.sample_hash,   # changed sampling settings of this NFE re-run the job
            evaluate_every=P.evaluate_every,
            args=P.args,
        resources:
            cluster_jobs=1,   # a queued job (capped by the slurm profile)
        log:
            f"{LOGS}/sample-nfe{{nfe}}.log",
        shell:
            "cmbench launch sample {params.args:q} --nfe {wildcards.nfe:q} > {log:q} 2>&1"

    # one job per metric set (exact/pixel metrics, each FID library), all reading the same samples
    rule evaluate:
        input:
            samples=SAMPLES,
            reference=P.reference,
        output:
            METRICS,
        params:
            sample_hash=P.sample_hash,   # the samples it reads (changed evaluation settings change the reference)
            evaluate_every=P.evaluate_every,
            args=P.args,
            metric=P.metric_set,
        resources:
            cluster_jobs=1,   # a queued job (capped by the slurm profile)
        log:
            f"{LOGS}/evaluate-nfe{{nfe}}-{{metric}}.log",
        shell:
            "cmbench launch evaluate {params.args:q} --nfe {wildcards.nfe:q} --metric {params.metric:q} > {log:q} 2>&1"

    rule collect:
        input:
            P.metric_inputs,
        output:
            RECORDS,
        params:
            args=P.args,
        log:
            f"{LOGS}/collect.log",
        shell:
            "cmbench launch collect {params.args:q} > {log:q} 2>&1"


if P.studies():

    # Li, Huang & Wei (2024): CT step count vs dimension on exact Gaussian data (no trained run needed)
    rule theory:
        output:
            shown(P.studies()),
        params:
            out=f"{P.results}/studies/theory",
        log:
            f"{P.results}/studies/logs/theory.log",
        shell:
            "python -m cmbench.studies.theory {params.out:q} > {log:q} 2>&1"


rule report:
    input:
        records=P.record_files(),
        papers=P.paper_numbers(),
    output:
        shown(P.tables()),
    params:
        tables=f"{P.results}/tables",
        plots=f"{P.results}/plots",
    log:
        f"{P.results}/tables/logs/report-{P.suite}.log",
    shell:
        "cmbench report --suite {P.suite:q} --records {input.records:q} --paper-numbers {input.papers:q} "
        "--tables {params.tables:q} --plots {params.plots:q} > {log:q} 2>&1"


# a picture of each dataset's samples: every variant (its run of the suite's first seed) at each NFE
rule pictures:
    input:
        P.picture_inputs(),
    output:
        shown(P.pictures()),
    params:
        runs=P.picture_runs(),
        plots=f"{P.results}/plots",
    log:
        f"{P.results}/plots/logs/pictures-{P.suite}.log",
    shell:
        "python -m cmbench.report.pictures --plots {params.plots:q} {params.runs:q} > {log:q} 2>&1"
