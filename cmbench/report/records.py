"""Metric records (each run's metrics/records.json) as one tidy DataFrame; each record's column key; which records
summarise a run (its last step), which come from a teacher, which measure re-noising; the training statistics
beside them."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd

from cmbench import io, paths
from cmbench.metrics.files import read_records
from cmbench.metrics.keys import ODE_ERROR, ORDER

ID_COLUMNS = ["suite", "dataset", "variant", "seed", "nfe", "metric", "backend", "mode", "value", "ideal"]
RUN_COLUMNS = ["suite", "dataset", "variant", "seed"]
TEACHER_SAMPLERS = ("heun",)     # a diffusion teacher is sampled with an ODE solver, a student in one or few jumps


def load_records(files) -> pd.DataFrame:
    rows = []
    for f in files:
        for r in read_records(f):
            rows.append({**r, "records_file": str(f)})
    df = pd.DataFrame(rows)
    for c in ID_COLUMNS + ["n_gen", "sigmas"]:
        if c not in df:
            df[c] = None
    df["mode"] = df["mode"].map(lambda m: "" if m is None or (isinstance(m, float) and math.isnan(m)) else str(m))
    df["sigmas"] = df["sigmas"].map(lambda s: " ".join(f"{x:g}" for x in s) if isinstance(s, list) else "n/a")
    df["seed"], df["nfe"] = df["seed"].astype(int), df["nfe"].astype(int)
    df["value"] = df["value"].astype(float)
    df["ideal"] = pd.to_numeric(df["ideal"], errors="coerce")
    return df[ID_COLUMNS + [c for c in df.columns if c not in ID_COLUMNS]].sort_values(
        ["suite", "dataset", "variant", "metric", "backend", "mode", "nfe", "seed"], ignore_index=True)


def last_step(df: pd.DataFrame) -> pd.DataFrame:
    """The records that summarise each run: those of its last training step (records at intermediate checkpoints
    carry smaller steps). Records without a step (older files) count as final."""
    if "step" not in df:
        return df
    step = pd.to_numeric(df["step"])
    last = step.groupby([df[c] for c in RUN_COLUMNS], dropna=False).transform("max")
    return df[step.isna() | (step == last)]


def is_teacher(d: pd.DataFrame) -> pd.Series:
    """Per record: made by a teacher (TEACHER_SAMPLERS), not by a consistency model."""
    return d["sampler"].isin(TEACHER_SAMPLERS) if "sampler" in d else pd.Series(False, index=d.index)


def renoised(d: pd.DataFrame) -> pd.Series:
    """Per record: an ODE error of multi-step consistency sampling, which re-noises between steps, so the error
    measures that fresh noise more than the model (its ideal is n/a). Kept in the CSVs, out of headline tables."""
    return (d["metric"] == ODE_ERROR) & (d["nfe"] > 1) & ~is_teacher(d)


def metric_rank(m: str) -> tuple:
    """Sort key: the metrics of keys.ORDER in that order, then any other alphabetically."""
    return (ORDER.index(m), "") if m in ORDER else (len(ORDER), m)


def backend_label(backend, mode: str) -> str:
    return f"{backend}/{mode}" if mode else str(backend)


def with_keys(d: pd.DataFrame) -> pd.DataFrame:
    """A column key per record: the metric, plus [backend/mode] where the dataset has that metric from several."""
    d = d.copy()
    d["backend_label"] = [backend_label(b, m) for b, m in zip(d["backend"], d["mode"])]
    several = d.groupby("metric")["backend_label"].nunique()
    d["key"] = [f"{m} [{b}]" if several[m] > 1 else m for m, b in zip(d["metric"], d["backend_label"])]
    return d


def stats_file_of(records_file: str | Path) -> Path | None:
    """The training statistics of the run whose `paths.records_file` this is; None for a records file outside
    the run layout (e.g. the test fixtures)."""
    f = Path(records_file).resolve()
    rdir = f.parent.parent
    return paths.stats_file(rdir) if paths.records_file(rdir) == f else None


def training_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Tidy training statistics (loss, grad_norm vs step) of every run whose records are in df."""
    runs = df.drop_duplicates("records_file")[["records_file", "dataset", "variant", "seed"]]
    parts = []
    for f, dataset, variant, seed in runs.itertuples(index=False):
        stats = stats_file_of(f)
        if stats is None or not stats.exists():
            continue
        lines, torn = io.read_jsonl(stats)
        if torn:     # a training run killed mid-line: its curve goes without that line
            print(f"cmbench: {stats}: skipped {torn} torn line(s)", file=sys.stderr)
        s = pd.DataFrame(lines)
        qs = [q for q in ("loss", "grad_norm") if q in s]
        if "step" not in s or not qs:
            continue
        s = s.melt(id_vars="step", value_vars=qs, var_name="quantity").dropna()
        parts.append(s.assign(dataset=dataset, variant=variant, seed=int(seed)))
    cols = ["dataset", "variant", "seed", "step", "quantity", "value"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)
