"""ODE error vs sample quality (Vouitsis et al. 2024; papers.md §6): does "Direct CM has lower ODE error but
worse sample quality than CD" hold here? The ODE error is measured against the exact PF-ODE map on toy data, and
against the teacher's own PF-ODE solution of the same noise on images (at one step, for runs with a trained
teacher: cmbench.metrics.ode_ref). The claim is declared once (`DIRECT_CM_VS_CD`); every function here takes it."""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cmbench.metrics.keys import FD, FID, ODE_ERROR, SLICED_W2, W2
from cmbench.report.outputs import ode_vs_quality_files
from cmbench.report.records import last_step, with_keys
from cmbench.report.tables import BOOKTABS, TEX_HEADER, md_table, mean_sd, tex_table, write_csv, write_lines


@dataclass(frozen=True)
class Claim:
    """`variant` has lower ODE error but worse sample quality (a higher quality metric) than `baseline`."""
    text: str
    source: str
    variant: str
    name: str                  # display name of `variant`
    baseline: str
    baseline_name: str

    @property
    def names(self) -> dict[str, str]:
        return {self.baseline: self.baseline_name, self.variant: self.name}


DIRECT_CM_VS_CD = Claim(text="Direct CM has lower ODE error but worse sample quality than CD",
                        source="Vouitsis et al. 2024, papers.md §6", variant="direct_cm", name="Direct CM",
                        baseline="cd", baseline_name="CD")
NFES = (1, 2)                  # one-step sampling, and two steps (whose second re-noises)
TABLE_COLUMNS = ["dataset", "NFE", "quality metric", "variant", "ODE error", "quality", "seeds"]
VERDICT_COLUMNS = ["dataset", "nfe", "quality_metric", "outcome", "verdict"]


def quality_metrics(d: pd.DataFrame) -> list[str]:
    """The quality columns among records with column keys (records.with_keys: the metric, with [backend/mode]
    where several backends give it): W2 where the data are Gaussian (exact); else the Fréchet distance (data or
    pixel space), sliced W2 (mixtures) and each backend's FID (images)."""
    present = set(d["metric"])
    metrics = [W2] if W2 in present else [m for m in (FD, SLICED_W2, FID) if m in present]
    return [k for m in metrics for k in sorted(set(d.loc[d["metric"] == m, "key"]))]


def comparisons(df: pd.DataFrame) -> Iterator[tuple[str, int, str, pd.DataFrame, pd.DataFrame]]:
    """(dataset, NFE, quality metric, ODE-error records, quality records) for every dataset and NFE (of NFES) with
    ODE-error records (images have them at one step only), from each run's last-step records."""
    d = last_step(df)
    d = d[d["nfe"].isin(NFES)]
    for dataset, dd in d.groupby("dataset", sort=True):
        if ODE_ERROR not in set(dd["metric"]):
            continue
        for nfe, dn in with_keys(dd).groupby("nfe", sort=True):
            ode = dn[dn["metric"] == ODE_ERROR]
            for qm in quality_metrics(dn) if len(ode) else []:
                yield dataset, int(nfe), qm, ode, dn[dn["key"] == qm]


def _stats(v: pd.Series) -> tuple[float, float, int]:
    return float(v.mean()), (float(v.std()) if len(v) > 1 else math.nan), len(v)


def _compare(a: tuple, b: tuple) -> str:
    """'lower' / 'higher' when the mean ± sd intervals of a and b are apart, 'within' when they overlap,
    'unknown' when either has one seed (no spread)."""
    (ma, sa, _), (mb, sb, _) = a, b
    if math.isnan(sa) or math.isnan(sb):
        return "unknown"
    if abs(ma - mb) <= sa + sb:
        return "within"
    return "lower" if ma < mb else "higher"


def _ms(s: tuple) -> str:
    m, sd, _ = s
    return f"{m:.3g}" if math.isnan(sd) else f"{m:.3g} ± {sd:.2g}"


def verdict(claim: Claim, ode: dict, quality: dict, metric: str) -> tuple[str, str]:
    """(outcome, sentence) for the claim, from per-variant (mean, sd, n) of ODE error and quality (lower = better).
    Holds when the variant's ODE error is lower and its quality metric higher than the baseline's, both beyond
    the seed spread (mean ± sd intervals apart); does not hold when either comparison goes the other way beyond
    the spread; otherwise inconclusive."""
    missing = [name for v, name in claim.names.items() if v not in ode or v not in quality]
    if missing:
        return "not evaluated", f"not evaluated: no {' or '.join(missing)} records"
    ours, base, base_name = claim.variant, claim.baseline, claim.baseline_name
    o, q = _compare(ode[ours], ode[base]), _compare(quality[ours], quality[base])
    detail = (f"ODE error {_ms(ode[ours])} vs {base_name} {_ms(ode[base])}; "
              f"{metric} {_ms(quality[ours])} vs {base_name} {_ms(quality[base])}")
    ode_word = {"lower": "lower", "higher": "higher", "within": "similar", "unknown": "unresolved"}[o]
    q_word = {"lower": "better", "higher": "worse", "within": "similar", "unknown": "unresolved"}[q]
    if o == "lower" and q == "higher":
        return "holds", f"holds: {claim.name} has lower ODE error but worse {metric} ({detail})"
    if o == "higher" or q == "lower":
        return "does not hold", (f"does not hold: {claim.name} has {ode_word} ODE error and {q_word} {metric} "
                                 f"({detail})")
    if "unknown" in (o, q):
        return "inconclusive", f"inconclusive: fewer than two seeds, no seed spread ({detail})"
    within = " and ".join(x for x, c in (("ODE-error", o), (metric, q)) if c == "within")
    return "inconclusive", f"inconclusive: {within} difference within seed spread ({detail})"


def ode_vs_quality(df: pd.DataFrame, claim: Claim) -> tuple[pd.DataFrame, pd.DataFrame]:
    """From records with an ODE-error metric, at NFES: a table (TABLE_COLUMNS: dataset, NFE, quality metric,
    variant, ODE error, quality, seeds) for every variant with an ODE error, and one verdict on the claim per
    dataset, NFE and quality metric (VERDICT_COLUMNS)."""
    rows, verdicts = [], []
    for dataset, nfe, qm, ode_v, q_v in comparisons(df):
        ode, qual = {}, {}
        for variant in sorted(set(ode_v["variant"])):
            o, q = ode_v[ode_v["variant"] == variant], q_v[q_v["variant"] == variant]
            if len(o):
                ode[variant] = _stats(o["value"])
            if len(q):
                qual[variant] = _stats(q["value"])
            rows.append([dataset, nfe, qm, variant, mean_sd(o["value"]), mean_sd(q["value"]),
                         str(len(set(o["seed"]) | set(q["seed"])))])
        verdicts.append([dataset, nfe, qm, *verdict(claim, ode, qual, qm)])
    return pd.DataFrame(rows, columns=TABLE_COLUMNS), pd.DataFrame(verdicts, columns=VERDICT_COLUMNS)


def points(df: pd.DataFrame) -> pd.DataFrame:
    """Per-seed (ODE error, quality) pairs at NFES: columns variant, seed, nfe, ode, quality and panel (dataset ·
    quality metric)."""
    cols = ["variant", "seed", "nfe"]
    parts = [ode[cols + ["value"]].rename(columns={"value": "ode"})
             .merge(q[cols + ["value"]].rename(columns={"value": "quality"}), on=cols)
             .assign(panel=f"{dataset} · {qm}")
             for dataset, _, qm, ode, q in comparisons(df)]
    return (pd.concat(parts, ignore_index=True) if parts
            else pd.DataFrame(columns=cols + ["ode", "quality", "panel"]))


def write_ode_vs_quality(df: pd.DataFrame, suite: str, tables: Path, claim: Claim) -> list[Path]:
    table, verdicts = ode_vs_quality(df, claim)
    intro = (f"Claim tested ({claim.source}): \"{claim.text}\". Quality: W2 for Gaussian data, "
             "Fréchet distance and sliced W2 for mixtures, pixel-space Fréchet distance and FID for images (lower "
             "is better). The ODE error is measured against the exact PF-ODE map on toy data; on images, at one "
             "step, against the teacher's own Heun solution of the same noise (records: ode_ref_convergence is that "
             "solution's own error, against twice the steps). A verdict holds or fails only when "
             f"the mean ± sd (over seeds) intervals of {claim.name} and {claim.baseline_name} are apart. At NFE 2 "
             "the sampler re-noises with fresh noise, so the ODE error there mostly measures that noise (its ideal "
             "is n/a); the NFE 1 verdicts are the ones that test the claim.")
    md = [f"# ODE error vs sample quality: suite `{suite}`", "", intro, ""]
    tex = [TEX_HEADER, f"% ODE error vs sample quality: suite {suite}", f"% {intro}", ""]
    if table.empty:
        none = (f"No {ODE_ERROR} records in this suite (toy data; images: runs with a trained teacher, at one "
                "step).")
        md.append(none)
        tex.append(f"% {BOOKTABS.escape(none)}")
    else:
        lines = [f"{r.dataset}, NFE {r.nfe}, {r.quality_metric}: {r.verdict}" for r in verdicts.itertuples()]
        md += ["## Verdicts", "", *[f"- {x}" for x in lines], "", "## Table", "",
               md_table(table.set_index("dataset")), ""]
        tex += [r"\begin{itemize}", *[r"\item " + BOOKTABS.escape(x) for x in lines], r"\end{itemize}", "",
                tex_table(table.set_index("dataset"),
                          f"Suite {suite}: ODE error vs sample quality (mean ± sd over seeds)")]
    paths = ode_vs_quality_files(tables, suite)
    write_csv(paths[0], table)
    write_lines(paths[1], md)
    write_lines(paths[2], tex)
    write_csv(paths[3], verdicts)
    return paths
