"""Summary tables (with the reported numbers beside our FIDs), FID library agreement, and the one table writer
of cmbench (CSV, Markdown, LaTeX: own small formatters, byte-stable, no jinja2 or tabulate), which also writes
the theory study's tables. Every file is written atomically (cmbench.io). The summary's CSV is tidy and in full
precision; its Markdown and LaTeX show 3 significant digits, students apart from the teacher."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from cmbench import io
from cmbench.metrics.keys import FID, HIGHER_IS_BETTER
from cmbench.report.outputs import summary_files
from cmbench.report.papers import FEATURES
from cmbench.report.records import is_teacher, last_step, metric_rank, renoised, with_keys


# ---------------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------------
def write_csv(path: Path, df: pd.DataFrame, **to_csv) -> Path:
    return io.atomic_write(path, lambda tmp: df.to_csv(tmp, index=False, lineterminator="\n", **to_csv))


def write_lines(path: Path, lines: list[str]) -> Path:
    """The lines, joined, ending in a newline."""
    text = "\n".join(lines)
    return io.write_text(path, text if text.endswith("\n") else text + "\n")


def _cells(t: pd.DataFrame) -> list[list[str]]:
    """The header (index name, column names) and then each row (index, values), as strings."""
    return [[t.index.name or "", *map(str, t.columns)],
            *([str(i), *map(str, row)] for i, row in zip(t.index, t.itertuples(index=False)))]


def md_table(t: pd.DataFrame, aligned: bool = False) -> str:
    """A Markdown pipe table of the cells exactly as formatted (numbers are not re-parsed). aligned: each column
    padded to its widest cell (at least its header + 2) and marked left-aligned, as tabulate writes it (the
    theory study's tables, read as text); else compact (the report's wide summary tables)."""
    rows = [[c.replace("|", "\\|") for c in r] for r in _cells(t)]
    widths = [max([len(r[j]) for r in rows[1:]] + [len(rows[0][j]) + 2]) if aligned else 0
              for j in range(len(rows[0]))]
    rule = "|" + "|".join(":" + "-" * (w + 1) if aligned else "---" for w in widths) + "|"
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join([lines[0], rule, *lines[1:]])


@dataclass(frozen=True)
class TexStyle:
    """How `tex_table` typesets a table. BOOKTABS, the report's: booktabs rules, caption above, scaled to the line
    width (the summary tables are wide; needs booktabs, graphicx, amssymb). PLAIN, the theory study's: \\hline
    rules, numbers right-aligned, small font, caption below. Each escapes the characters of its own text (PLAIN
    leaves braces alone: its notes write σ_{i+1})."""
    booktabs: bool
    symbols: Mapping[str, str]         # character → LaTeX

    def escape(self, s) -> str:
        return "".join(self.symbols.get(ch, ch) for ch in str(s))


_TEX_COMMON = {"\\": r"\textbackslash{}", "^": r"\textasciicircum{}", "&": r"\&", "%": r"\%", "_": r"\_",
               "#": r"\#", "·": r"$\cdot$", "×": r"$\times$", "–": "--"}
BOOKTABS = TexStyle(True, {**_TEX_COMMON, "$": r"\$", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                           "±": r"$\pm$", "Δ": r"$\Delta$", "✓": r"\checkmark{}", "✗": r"$\times$", "—": "---",
                           "≈": r"$\approx$", "−": "$-$", "≥": r"$\geq$", "≤": r"$\leq$", "`": ""})
PLAIN = TexStyle(False, {**_TEX_COMMON, "≤": r"$\le$", "≥": r"$\ge$", ">": "$>$", "ε": r"$\varepsilon$",
                         "σ": r"$\sigma$", "δ": r"$\delta$"})
TEX_HEADER = "% Written by cmbench.report. Needs \\usepackage{booktabs,graphicx,amssymb}."


def _tex_cell(c: str, style: TexStyle) -> str:
    """A cell, escaped; a Markdown-bold one (**...**) in bold."""
    bold = len(c) > 4 and c.startswith("**") and c.endswith("**")
    return r"\textbf{" + style.escape(c[2:-2]) + "}" if bold else style.escape(c)


def tex_table(t: pd.DataFrame, caption: str, style: TexStyle = BOOKTABS, rule_before: str | None = None) -> str:
    """A LaTeX table of the cells exactly as formatted (a Markdown-bold cell in bold), without a final newline.
    rule_before: the index label of a row that a rule sets apart from the rows above it."""
    rule = r"\midrule" if style.booktabs else r"\hline"
    head, *body = [(rule + "\n" if r[0] == rule_before else "") + " & ".join(_tex_cell(c, style) for c in r)
                   + r" \\" for r in _cells(t)]
    caption = r"\caption{" + style.escape(caption) + "}"
    if style.booktabs:
        lines = [r"\centering", caption, r"\resizebox{\linewidth}{!}{%",
                 r"\begin{tabular}{" + "l" * (len(t.columns) + 1) + "}", r"\toprule", head, r"\midrule", *body,
                 r"\bottomrule", r"\end{tabular}}"]
    else:
        lines = [r"\centering\small", r"\begin{tabular}{l" + "r" * len(t.columns) + "}", r"\hline", head, r"\hline",
                 *body, r"\hline", r"\end{tabular}", caption]
    return "\n".join([r"\begin{table}[ht]", *lines, r"\end{table}"])


# ---------------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------------
NOT_EVALUATED, NO_PAPER, NA = "not evaluated", "no paper number", "n/a"
LEGEND = [
    ("Cells: mean ± sd over training seeds, the mean to 3 significant digits, the sd to 2 (the summary CSV keeps "
     "full precision); n, the number of seeds, is stated above each table, and in a cell only where it differs."),
    ("Students (the consistency models) first, the best in each column in bold (lower is better; higher for "
     f"{', '.join(HIGHER_IS_BETTER)}); the teacher, sampled with an ODE solver (the `edm` teacher: Heun, e.g. "
     "NFE 35), has its own table at its own NFEs."),
    ("`ideal`: what exact samples score at the same n (the sampling-noise floor); n/a where no such value exists."),
    ("ODE error at NFE ≥ 2 is in the CSV only: multi-step consistency sampling re-noises between steps, so there "
     "it measures that fresh noise more than the model."),
    "`not evaluated`: this variant has no record at this NFE.",
    ("FID columns of datasets with reported numbers: `paper` = the primary entry of configs/paper_numbers.yaml "
     "(marked (secondary) when read in a source that re-cites it, (unverified) when not confirmed); "
     "`Δ` = our mean − paper; `protocol`: ✓ our records match the paper's protocol (sample count, Inception "
     "variant, reference split, conditioning, aggregation), ✗ a difference, ? a detail that is not recorded or "
     "not stated; `no paper number`: none reported for this variant and NFE; n/a: not applicable."),
]


def fmt(x: float, digits: int = 3) -> str:
    """`digits` significant digits, trailing zeros kept (0.0880, 1.20e-05, 312); zero as 0."""
    if x == 0:
        return "0"
    s = f"{x:#.{digits}g}"
    return s if "e" in s else s.rstrip(".")


def _mean_sd(mean: float, sd: float) -> str:
    """The mean to 3 significant digits, the sd (its uncertainty's size) to 2."""
    return fmt(mean) if math.isnan(sd) else f"{fmt(mean)} ± {fmt(sd, 2)}"


def mean_sd(v: pd.Series) -> str:
    """'mean ± sd' of the values (the mean alone for one), NOT_EVALUATED for none."""
    v = v.dropna()
    return _mean_sd(v.mean(), v.std() if len(v) > 1 else math.nan) if len(v) else NOT_EVALUATED


def _count(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else f"{n:,}"


# ---------------------------------------------------------------------------------------------------------------
# Our records against a paper's protocol
# ---------------------------------------------------------------------------------------------------------------
def _record_features(backend: str, mode: str) -> str | None:
    if backend == "torch-fidelity":
        return "inception_tf"                 # torch-fidelity's port of the TF Inception graph (pool3)
    if backend == "clean-fid":
        return {"legacy_tensorflow": "inception_tf", "clean": "inception_clean",
                "legacy_pytorch": "inception_torchvision"}.get(mode)
    return None


def protocol_flag(records: pd.DataFrame, entry: dict) -> str:
    """✓, or '; '-joined differences (✗) and unknowns (?) between our records and the paper's protocol."""
    p, bad, unknown = entry["protocol"], [], []
    if p["n_samples"] is None and p["features"] is None and p["reference_split"] is None:
        unknown.append("paper protocol not stated")
    else:
        ns = sorted({int(n) for n in records["n_gen"].dropna()})
        if p["n_samples"] is None:
            unknown.append("paper sample count not stated")
        elif not ns:
            unknown.append("our sample count not recorded")
        elif ns != [p["n_samples"]]:
            bad.append(f"{'/'.join(_count(n) for n in ns)} samples vs {_count(p['n_samples'])}")
        ours = {_record_features(b, m) for b, m in zip(records["backend"], records["mode"])}
        if p["features"] is None:
            unknown.append("paper Inception variant not stated")
        elif None in ours:
            unknown.append(f"features of {'/'.join(sorted(set(records['backend_label'])))} unknown")
        elif ours != {p["features"]}:
            bad.append(f"{'/'.join(FEATURES[f] for f in sorted(ours))} vs {FEATURES[p['features']]}")
        splits = sorted(set(records["reference_split"].dropna())) if "reference_split" in records else []
        if p["reference_split"] is None:
            unknown.append("paper reference not stated")
        elif not splits:
            unknown.append("our reference split not recorded")
        elif splits != [p["reference_split"]]:
            bad.append(f"reference {'/'.join(splits)} vs {p['reference_split']}")
    if "fid_dims" in records and records["fid_dims"].notna().any():
        dims = sorted({int(d) for d in records["fid_dims"].dropna()} - {2048})
        if dims:
            bad.append(f"{'/'.join(map(str, dims))}-d Inception features vs 2048")
    good = []
    if "conditional" in records and records["conditional"].notna().any():
        ours = {bool(c) for c in records["conditional"].dropna()}
        word = {True: "conditional", False: "unconditional"}
        if ours != {p["conditional"]}:
            bad.append(f"{'/'.join(word[c] for c in sorted(ours))} vs {word[p['conditional']]}")
        elif p["conditional"]:
            good.append("conditional ✓")     # said out loud: every ImageNet 64 number of the papers is conditional
    if p.get("aggregate"):
        bad.append(f"paper: {p['aggregate']}, ours: mean over seeds")
    return "; ".join([f"✗ {b}" for b in bad] + [f"? {u}" for u in unknown] + good) or "✓"


def _paper_columns(name: str) -> list[str]:
    return [f"{name}: paper", f"{name}: Δ", f"{name}: protocol"]


def _paper_cells(name: str, entry: dict | None, r) -> dict[str, str]:
    """The paper value, Δ and protocol flag beside column `name`, from our summary row r of one variant (None:
    no records)."""
    if entry is None:
        return dict(zip(_paper_columns(name), (NO_PAPER, NA, NA)))
    paper = fmt(entry["value"]) + ("" if entry["status"] == "confirmed" else f" ({entry['status']})")
    if r is None:
        return dict(zip(_paper_columns(name), (paper, NOT_EVALUATED, NOT_EVALUATED)))
    delta = r["paper_delta"]
    return dict(zip(_paper_columns(name), (paper, ("+" if delta >= 0 else "") + fmt(delta), r["protocol"])))


# ---------------------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------------------
SUMMARY_COLUMNS = ["dataset", "role", "variant", "column", "metric", "backend", "nfe", "n", "mean", "sd", "ideal",
                   "best", "headline", "paper", "paper_status", "paper_delta", "protocol"]
ROLES = {"student": "Students", "teacher": "Teacher (sampled with an ODE solver, at its own NFEs)"}


def summary_records(df: pd.DataFrame, papers: dict) -> pd.DataFrame:
    """The summary in full precision (SUMMARY_COLUMNS), from each run's last-step records: one row per dataset,
    role, column (metric [backend/mode] @ NFE) and variant with records. role: `teacher` (records.is_teacher) or
    `student`; n: seeds; sd: NaN for one seed; best: the best student mean of the column, among two or more
    (keys.HIGHER_IS_BETTER says which way); headline: in the Markdown/LaTeX tables (not a re-noising ODE error);
    paper*, protocol: beside a primary reported number. papers: `papers.primary_numbers`."""
    parts = [_summary_rows(dataset, with_keys(d), papers)
             for dataset, d in last_step(df).groupby("dataset", sort=True)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SUMMARY_COLUMNS)


def _summary_rows(dataset: str, d: pd.DataFrame, papers: dict) -> pd.DataFrame:
    order = sorted(set(zip(d["metric"], d["key"], d["nfe"])), key=lambda c: (metric_rank(c[0]), c[1], c[2]))
    d = d.assign(role=is_teacher(d).map({True: "teacher", False: "student"}), headline=~renoised(d),
                 column=d["key"] + " @" + d["nfe"].astype(str),
                 position=[order.index(c) for c in zip(d["metric"], d["key"], d["nfe"])])
    rows = []
    for (role, _, variant), g in d.groupby(["role", "position", "variant"], sort=True):   # students first
        first, v, ideal = g.iloc[0], g["value"], g["ideal"].dropna()
        entry = papers.get((dataset, variant, first["metric"], int(first["nfe"])))
        rows.append([dataset, role, variant, first["column"], first["metric"], first["backend_label"],
                     int(first["nfe"]), len(v), v.mean(), v.std() if len(v) > 1 else math.nan,
                     ideal.iloc[0] if len(ideal) else math.nan, False, bool(first["headline"]),
                     *((entry["value"], entry["status"], v.mean() - entry["value"], protocol_flag(g, entry))
                       if entry else (math.nan, None, math.nan, None))])
    s = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    for _, g in s[(s["role"] == "student") & s["headline"]].groupby("column"):
        if len(g) > 1:
            top = g["mean"].max() if g["metric"].iloc[0] in HIGHER_IS_BETTER else g["mean"].min()
            s.loc[g.index[g["mean"] == top], "best"] = True
    return s


def _seed_count(n: int) -> str:
    return f"mean ± sd over n={n} training seeds" if n > 1 else "n=1 training seed (no sd)"


def _table(s: pd.DataFrame, dataset: str, papers: dict) -> tuple[pd.DataFrame, int]:
    """Summary rows of one dataset and role as a table of strings: index variant (then `ideal` where the rows
    carry ideal values), columns in the rows' order (a FID column of a dataset with reported numbers followed by
    paper, Δ and protocol); and n, the seed count most cells have (a cell with another says its own)."""
    n = int(s["n"].mode().iloc[-1])
    compare = {m for (ds, _, m, _) in papers if ds == dataset}          # metrics with reported numbers
    rows: dict[str, dict[str, str]] = {v: {} for v in sorted(s["variant"].unique())}
    ideal_row: dict[str, str] = {}
    for name, c in s.groupby("column", sort=False):
        metric, nfe, by_variant = c["metric"].iloc[0], int(c["nfe"].iloc[0]), c.set_index("variant")
        for v, row in rows.items():
            r = by_variant.loc[v] if v in by_variant.index else None
            if r is None:
                row[name] = NOT_EVALUATED
            else:
                cell = _mean_sd(r["mean"], r["sd"]) + ("" if r["n"] == n else f" (n={r['n']})")
                row[name] = f"**{cell}**" if r["best"] else cell
            if metric in compare:
                row |= _paper_cells(name, papers.get((dataset, v, metric, nfe)), r)
        ideal = c["ideal"].dropna()
        ideal_row[name] = fmt(ideal.iloc[0]) if len(ideal) else NA
        if metric in compare:
            ideal_row |= dict.fromkeys(_paper_columns(name), NA)
    if s["ideal"].notna().any():
        rows["ideal"] = ideal_row
    t = pd.DataFrame.from_dict(rows, orient="index")
    t.index.name = "variant"
    return t, n


def fid_agreement(df: pd.DataFrame) -> pd.DataFrame:
    """torch-fidelity vs clean-fid FID on the same sample sets: one row per pair (and clean-fid mode)."""
    f = df[df["metric"] == FID]
    tf, cf = f[f["backend"] == "torch-fidelity"], f[f["backend"] == "clean-fid"]
    cols = ["tf", "cf", "mode", "rel_diff", "dataset", "variant", "seed", "nfe"]
    if tf.empty or cf.empty:
        return pd.DataFrame(columns=cols)
    keys = ["suite", "dataset", "variant", "seed", "nfe"] + [
        c for c in ("checkpoint_sha256", "sample_seed_start", "n_gen") if c in f and f[c].notna().all()]
    m = tf[keys + ["value"]].merge(cf[keys + ["value", "mode"]], on=keys, suffixes=("_tf", "_cf"))
    m = m.rename(columns={"value_tf": "tf", "value_cf": "cf"})
    m["rel_diff"] = (m["cf"] - m["tf"]).abs() / m["tf"].abs()
    return m[cols].sort_values(["dataset", "mode", "variant", "nfe", "seed"], ignore_index=True)


def _agreement_text(a: pd.DataFrame) -> str:
    return "; ".join(f"clean-fid/{mode or 'default'} vs torch-fidelity: max relative difference "
                     f"{100 * g['rel_diff'].max():.2g}% over {len(g)} sample sets"
                     for mode, g in a.groupby("mode", sort=True))


def _dataset_note(dataset: str, d: pd.DataFrame, df_all: pd.DataFrame) -> str:
    d = with_keys(d)
    seeds = sorted(int(s) for s in d["seed"].unique())
    ns = sorted({int(n) for n in d["n_gen"].dropna()})
    by_backend = d.groupby("backend_label")["metric"].agg(lambda m: sorted(set(m), key=metric_rank))
    backends = "; ".join(f"{b} ({', '.join(ms)})" for b, ms in by_backend.items())
    note = (f"{', '.join(_count(n) for n in ns) if ns else 'unrecorded'} samples per run; seeds {seeds}; "
            f"backend{'s' if len(by_backend) > 1 else ''}: {backends}.")
    if "weights_verified" in d and d["weights_verified"].eq(False).any():   # NaN: a record without FID weights
        note += " FID from UNVERIFIED Inception weights (CMBENCH_UNVERIFIED_WEIGHTS=1): not comparable with any paper."
    a = fid_agreement(df_all[df_all["dataset"] == dataset])
    if len(a):
        note += f" FID library agreement on the same samples: {_agreement_text(a)}."
    return note


def write_summary(df: pd.DataFrame, suite: str, papers: dict, tables: Path) -> list[Path]:
    """summary_{suite}.csv (`summary_records`), and per dataset a note, then the students' and the teacher's
    headline tables as Markdown and LaTeX."""
    df = last_step(df)
    summary = summary_records(df, papers)
    md = [f"# cmbench summary: suite `{suite}`", "", *[f"- {x}" for x in LEGEND], ""]
    tex = [TEX_HEADER, f"% cmbench summary: suite {suite}", *[f"% {x}" for x in LEGEND], ""]
    for dataset, s in summary[summary["headline"].astype(bool)].groupby("dataset", sort=True):   # bool: when empty
        note = _dataset_note(dataset, df[df["dataset"] == dataset], df)
        md += [f"## {dataset}", "", note, ""]
        tex.append(f"% {dataset}")
        for role, title in ROLES.items():
            part = s[s["role"] == role]
            if len(part):
                t, n = _table(part, dataset, papers)
                head = f"{title}: {_seed_count(n)}" + ("; the best per column in bold" if part["best"].any() else "")
                md += [f"{head}.", "", md_table(t), ""]
                tex += [tex_table(t, f"Suite {suite}, {dataset}. {head}. {note}", rule_before="ideal"), ""]
    paths = summary_files(tables, suite)
    write_csv(paths[0], summary, na_rep="NA")
    write_lines(paths[1], md)
    write_lines(paths[2], tex)
    return paths
