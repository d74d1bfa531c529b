"""Collate metric records → tidy DataFrame → tables (CSV, Markdown, LaTeX) and seaborn plots. Never imports torch.

Outputs of one suite (`report_outputs`, a pure function of the suite name, so Snakemake knows them up front):

    tables/records.csv                         every record, tidy
    tables/summary_{suite}.{csv,md,tex}         per dataset: rows variants (+ the `ideal` noise floor where records
                                                carry one), columns metric [backend/mode] × NFE; FID columns of
                                                datasets with paper numbers get the paper value, Δ and a
                                                protocol-match flag beside them
    tables/ode_vs_quality_{suite}.{csv,md,tex}  ODE error vs sample quality per toy dataset, NFE and variant
    tables/ode_vs_quality_verdicts_{suite}.csv  does "Direct CM: lower ODE error, worse samples than CD" hold here?
    plots/{suite}_metrics.png                   metric vs NFE per variant
    plots/{suite}_training.png                  training curves from each run's stats.jsonl
    plots/{suite}_fid_agreement.png             torch-fidelity vs clean-fid on the same samples
    plots/{suite}_ode_vs_quality.png            ODE error vs sample quality (CD and Direct CM highlighted)

A plot with nothing to show is a placeholder figure that says so. Reported numbers come from
configs/paper_numbers.yaml (`load_paper_numbers` validates it)."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import yaml

from cmbench.config import ConfigError

ID_COLUMNS = ["suite", "dataset", "variant", "seed", "nfe", "metric", "backend", "mode", "value", "ideal"]

# ---------------------------------------------------------------------------------------------------------------
# Reported numbers (configs/paper_numbers.yaml)
# ---------------------------------------------------------------------------------------------------------------
PAPER_DATASETS = ("cifar10", "imagenet64")
STATUSES = ("confirmed", "secondary", "unverified")
FEATURES = {"inception_tf": "TF Inception", "inception_clean": "clean-fid clean Inception",
            "inception_torchvision": "torchvision Inception", "dinov2": "DINOv2"}
ENTRY_REQUIRED = ("dataset", "method", "variant", "nfe", "metric", "value", "status", "citation", "protocol",
                  "budget", "source")
ENTRY_OPTIONAL = ("primary", "model", "note")
PROTOCOL_REQUIRED = ("n_samples", "reference_split", "reference", "inception", "features", "conditional")
PROTOCOL_OPTIONAL = ("aggregate",)
DEFAULT_PAPER_NUMBERS = Path("configs") / "paper_numbers.yaml"


def _check_protocol(p, where: str) -> dict:
    if not isinstance(p, dict):
        raise ConfigError(f"{where}: must be a mapping with {', '.join(PROTOCOL_REQUIRED)}")
    missing = [k for k in PROTOCOL_REQUIRED if k not in p]
    unknown = sorted(set(p) - set(PROTOCOL_REQUIRED) - set(PROTOCOL_OPTIONAL))
    if missing or unknown:
        raise ConfigError(f"{where}: " + "; ".join(([f"missing field(s) {', '.join(missing)}"] if missing else [])
                                                  + ([f"unknown field(s) {', '.join(unknown)}"] if unknown else [])))
    n = p["n_samples"]
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise ConfigError(f"{where}: n_samples must be a positive integer or null, got {n!r}")
    if p["features"] is not None and p["features"] not in FEATURES:
        raise ConfigError(f"{where}: features {p['features']!r} is not one of {', '.join(FEATURES)} or null")
    if not isinstance(p["conditional"], bool):
        raise ConfigError(f"{where}: conditional must be true or false, got {p['conditional']!r}")
    for k in ("reference", "inception"):
        if not isinstance(p[k], str) or not p[k].strip():
            raise ConfigError(f"{where}: {k} must be a non-empty string")
    for k in ("reference_split", "aggregate"):
        if p.get(k) is not None and (not isinstance(p[k], str) or not p[k].strip()):
            raise ConfigError(f"{where}: {k} must be a non-empty string or null")
    return dict(p)


def _check_entry(e, i: int, protocols: dict, variants: set[str] | None, where: str) -> dict:
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: entries[{i}] must be a mapping")
    label = f"{where}: entries[{i}] ({e.get('dataset')} {e.get('method')!r} NFE {e.get('nfe')})"
    missing = [k for k in ENTRY_REQUIRED if k not in e]
    if missing:
        raise ConfigError(f"{label}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(e) - set(ENTRY_REQUIRED) - set(ENTRY_OPTIONAL))
    if unknown:
        raise ConfigError(f"{label}: unknown field(s) {', '.join(unknown)}")
    if e["dataset"] not in PAPER_DATASETS:
        raise ConfigError(f"{label}: dataset {e['dataset']!r} is not one of {', '.join(PAPER_DATASETS)}")
    if e["status"] not in STATUSES:
        raise ConfigError(f"{label}: status {e['status']!r} is not one of {', '.join(STATUSES)}")
    if isinstance(e["nfe"], bool) or not isinstance(e["nfe"], int) or e["nfe"] <= 0:
        raise ConfigError(f"{label}: nfe must be a positive integer, got {e['nfe']!r}")
    if isinstance(e["value"], bool) or not isinstance(e["value"], (int, float)) or not math.isfinite(e["value"]) \
            or e["value"] < 0:
        raise ConfigError(f"{label}: value must be a non-negative number, got {e['value']!r}")
    for k in ("method", "metric", "citation", "budget", "source"):
        if not isinstance(e[k], str) or not e[k].strip():
            raise ConfigError(f"{label}: {k} must be a non-empty string")
    for k in ("model", "note"):
        if e.get(k) is not None and (not isinstance(e[k], str) or not e[k].strip()):
            raise ConfigError(f"{label}: {k} must be a non-empty string when given")
    if not e["source"].startswith("§"):
        raise ConfigError(f"{label}: source must name a papers.md section (§...), got {e['source']!r}")
    v = e["variant"]
    if v is not None and (not isinstance(v, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", v)):
        raise ConfigError(f"{label}: variant must be a variant name or null, got {v!r}")
    if v is not None and variants is not None and v not in variants:
        raise ConfigError(f"{label}: unknown variant {v!r} (no configs/variants/{v}.yaml; use null)")
    primary = e.get("primary", False)
    if not isinstance(primary, bool):
        raise ConfigError(f"{label}: primary must be true or false, got {primary!r}")
    if primary and v is None:
        raise ConfigError(f"{label}: primary: true needs a variant (the summary compares our variant with it)")
    proto = e["protocol"]
    if isinstance(proto, str):
        if proto not in protocols:
            raise ConfigError(f"{label}: unknown protocol {proto!r} (not in `protocols`)")
        name, proto = proto, protocols[proto]
    else:
        name, proto = "inline", _check_protocol(proto, f"{label}: protocol")
    return {"dataset": e["dataset"], "method": e["method"], "variant": v, "model": e.get("model"),
            "nfe": e["nfe"], "metric": e["metric"], "value": float(e["value"]), "primary": primary,
            "status": e["status"], "citation": e["citation"], "protocol_name": name, "protocol": proto,
            "budget": e["budget"], "source": e["source"], "note": e.get("note")}


def load_paper_numbers(path: str | Path, variants: set[str] | None = None) -> pd.DataFrame:
    """The validated reported numbers, one row per entry (`protocol` holds the resolved protocol mapping).
    `variants`: the known variant names (default: configs/variants/*.yaml beside the file, where that exists).
    A bad file raises ConfigError with a one-line message naming the entry."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or set(data) != {"protocols", "entries"}:
        raise ConfigError(f"{path}: must be a mapping with exactly the keys 'protocols' and 'entries'")
    if not isinstance(data["protocols"], dict) or not isinstance(data["entries"], list):
        raise ConfigError(f"{path}: 'protocols' must be a mapping and 'entries' a list")
    if variants is None and (path.parent / "variants").is_dir():
        variants = {p.stem for p in (path.parent / "variants").glob("*.yaml")}
    protocols = {k: _check_protocol(p, f"{path}: protocols.{k}") for k, p in data["protocols"].items()}
    entries = [_check_entry(e, i, protocols, variants, str(path)) for i, e in enumerate(data["entries"])]
    seen, primaries = {}, {}
    for i, e in enumerate(entries):
        key = (e["dataset"], e["metric"], e["nfe"], e["method"], e["model"])
        if key in seen:
            raise ConfigError(f"{path}: entries[{i}] duplicates entries[{seen[key]}] "
                              f"({e['dataset']} {e['method']!r} model {e['model']!r} {e['metric']} NFE {e['nfe']})")
        seen[key] = i
        if e["variant"] is not None:
            primaries.setdefault((e["dataset"], e["variant"], e["metric"], e["nfe"]), []).append((i, e["primary"]))
    for (dataset, variant, metric, nfe), flags in primaries.items():
        marked = [i for i, p in flags if p]
        if len(marked) != 1:
            what = (f"duplicate primary (entries {', '.join(map(str, marked))})" if marked
                    else f"no primary entry among entries {', '.join(str(i) for i, _ in flags)}")
            raise ConfigError(f"{path}: {dataset}/{variant} {metric} NFE {nfe}: {what}; mark exactly one primary: true")
    return pd.DataFrame(entries)


def primary_numbers(papers: pd.DataFrame) -> dict[tuple, dict]:
    """(dataset, variant, metric, nfe) → the primary entry."""
    if papers is None or papers.empty:
        return {}
    return {(r["dataset"], r["variant"], r["metric"], int(r["nfe"])): r
            for r in papers[papers["primary"]].to_dict("records")}


def _default_paper_numbers() -> Path | None:
    for p in (DEFAULT_PAPER_NUMBERS, Path(__file__).resolve().parents[1] / DEFAULT_PAPER_NUMBERS):
        if p.exists():
            return p
    return None


# ---------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------
def load_records(files) -> pd.DataFrame:
    rows = []
    for f in files:
        for r in json.loads(Path(f).read_text()):
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


METRIC_ORDER = ["fid", "fd_dinov2", "fd_pixels", "w2", "fd", "sliced_w2", "near_mode_fraction", "mode_coverage_min",
                "ode_error"]
NOT_EVALUATED, NO_PAPER, NA, NOT_MEASURED = "not evaluated", "no paper number", "n/a", "not measured on this dataset"
LEGEND = [
    "Cells: mean ± sd over training seeds (n = number of seeds; one seed: no sd).",
    ("`ideal`: what exact samples score at the same n (the sampling-noise floor); n/a where no such value exists "
     "(e.g. the ODE error of a 2-step sampler, which re-noises)."),
    "`not evaluated`: this variant has no record at this NFE (the `edm` teacher is sampled with Heun, e.g. NFE 35).",
    ("FID columns of datasets with reported numbers: `paper` = the primary entry of configs/paper_numbers.yaml "
     "(marked (secondary) when read in a source that re-cites it, (unverified) when not confirmed); "
     "`Δ` = our mean − paper; `protocol`: ✓ our records match the paper's protocol (sample count, Inception "
     "variant, reference split, conditioning, aggregation), ✗ a difference, ? a detail that is not recorded or "
     "not stated; `no paper number`: none reported for this variant and NFE; n/a: not applicable."),
]


def _backend_label(backend, mode: str) -> str:
    return f"{backend}/{mode}" if mode else str(backend)


def _metric_rank(m: str) -> tuple:
    return (METRIC_ORDER.index(m), "") if m in METRIC_ORDER else (len(METRIC_ORDER), m)


def _with_keys(d: pd.DataFrame) -> pd.DataFrame:
    """A column key per record: the metric, plus [backend/mode] where the dataset has that metric from several."""
    d = d.copy()
    d["backend_label"] = [_backend_label(b, m) for b, m in zip(d["backend"], d["mode"])]
    several = d.groupby("metric")["backend_label"].nunique()
    d["key"] = [f"{m} [{b}]" if several[m] > 1 else m for m, b in zip(d["metric"], d["backend_label"])]
    return d


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _mean_sd(v: pd.Series) -> str:
    v = v.dropna()
    if len(v) == 0:
        return NOT_EVALUATED
    if len(v) == 1:
        return f"{_fmt(v.iloc[0])} (n=1)"
    return f"{_fmt(v.mean())} ± {v.std():.2g} (n={len(v)})"


def _count(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 and n >= 1000 else f"{n:,}"


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


def _paper_cell(entry: dict) -> str:
    return _fmt(entry["value"]) + ("" if entry["status"] == "confirmed" else f" ({entry['status']})")


def _paper_metrics(dataset: str, papers: dict) -> set[str]:
    return {m for (ds, _, m, _) in papers if ds == dataset}


def summary_tables(df: pd.DataFrame, papers: dict) -> dict[str, pd.DataFrame]:
    """dataset → table of strings (index: variant, then `ideal` where the records carry ideal values)."""
    out = {}
    for dataset, d in df.groupby("dataset", sort=True):
        d = _with_keys(d)
        cols = sorted({(k, m, n) for k, m, n in zip(d["key"], d["metric"], d["nfe"])},
                      key=lambda c: (_metric_rank(c[1]), c[0], c[2]))
        variants = sorted(d["variant"].unique())
        compare = _paper_metrics(dataset, papers)
        table: dict[str, dict[str, str]] = {v: {} for v in variants}
        has_ideal = d["ideal"].notna().any()
        ideal_row: dict[str, str] = {}
        for key, metric, nfe in cols:
            name = f"{key} @{nfe}"
            c = d[(d["key"] == key) & (d["nfe"] == nfe)]
            ideal = c["ideal"].dropna()
            ideal_row[name] = _fmt(ideal.iloc[0]) if len(ideal) else NA
            for v in variants:
                r = c[c["variant"] == v]
                table[v][name] = _mean_sd(r["value"])
                if metric not in compare:
                    continue
                entry = papers.get((dataset, v, metric, int(nfe)))
                if entry is None:
                    table[v] |= {f"{name}: paper": NO_PAPER, f"{name}: Δ": NA, f"{name}: protocol": NA}
                elif r.empty:
                    table[v] |= {f"{name}: paper": _paper_cell(entry), f"{name}: Δ": NOT_EVALUATED,
                                 f"{name}: protocol": NOT_EVALUATED}
                else:
                    table[v] |= {f"{name}: paper": _paper_cell(entry),
                                 f"{name}: Δ": f"{r['value'].mean() - entry['value']:+.3g}",
                                 f"{name}: protocol": protocol_flag(r, entry)}
            if metric in compare:
                ideal_row |= {f"{name}: paper": NA, f"{name}: Δ": NA, f"{name}: protocol": NA}
        rows = dict(table)
        if has_ideal:
            rows["ideal"] = ideal_row
        t = pd.DataFrame.from_dict(rows, orient="index")
        t.index.name = "variant"
        out[dataset] = t
    return out


def fid_agreement(df: pd.DataFrame) -> pd.DataFrame:
    """torch-fidelity vs clean-fid FID on the same sample sets: one row per pair (and clean-fid mode)."""
    f = df[df["metric"] == "fid"]
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
    d = _with_keys(d)
    seeds = sorted(int(s) for s in d["seed"].unique())
    ns = sorted({int(n) for n in d["n_gen"].dropna()})
    by_backend = d.groupby("backend_label")["metric"].agg(lambda m: sorted(set(m), key=_metric_rank))
    backends = "; ".join(f"{b} ({', '.join(ms)})" for b, ms in by_backend.items())
    note = (f"{', '.join(_count(n) for n in ns) if ns else 'unrecorded'} samples per run; seeds {seeds}; "
            f"backend{'s' if len(by_backend) > 1 else ''}: {backends}.")
    a = fid_agreement(df_all[df_all["dataset"] == dataset])
    if len(a):
        note += f" FID library agreement on the same samples: {_agreement_text(a)}."
    return note


# ---------------------------------------------------------------------------------------------------------------
# Writers: CSV, Markdown, LaTeX (own small formatters: byte-stable, no jinja2)
# ---------------------------------------------------------------------------------------------------------------
def _md_table(t: pd.DataFrame) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|")
    head = [t.index.name or ""] + [str(c) for c in t.columns]
    lines = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in [i, *row]) + " |" for i, row in zip(t.index, t.itertuples(index=False))]
    return "\n".join(lines)


_TEX_ESCAPE = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
               "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_UNICODE = {"±": r"$\pm$", "Δ": r"$\Delta$", "✓": r"\checkmark{}", "✗": r"$\times$", "×": r"$\times$",
                "—": "---", "–": "--", "≈": r"$\approx$", "·": r"$\cdot$", "−": "$-$", "≥": r"$\geq$",
                "≤": r"$\leq$", "`": ""}


def tex_escape(s) -> str:
    s = "".join(_TEX_ESCAPE.get(ch, ch) for ch in str(s))
    return "".join(_TEX_UNICODE.get(ch, ch) for ch in s)


def _tex_table(t: pd.DataFrame, caption: str) -> str:
    head = [t.index.name or ""] + [str(c) for c in t.columns]
    rows = [[i, *row] for i, row in zip(t.index, t.itertuples(index=False))]
    lines = [r"\begin{table}[ht]", r"\centering", r"\caption{" + tex_escape(caption) + "}",
             r"\resizebox{\linewidth}{!}{%", r"\begin{tabular}{" + "l" * len(head) + "}", r"\toprule",
             " & ".join(tex_escape(h) for h in head) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape(x) for x in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}}", r"\end{table}"]
    return "\n".join(lines)


TEX_HEADER = "% Written by cmbench.report. Needs \\usepackage{booktabs,graphicx,amssymb}."


def _write(path: Path, text: str) -> None:
    path.write_text(text if text.endswith("\n") else text + "\n")


def _csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, lineterminator="\n")


def write_summary(df: pd.DataFrame, suite: str, papers: dict, tables: Path) -> list[Path]:
    per = summary_tables(df, papers)
    csv_rows = []
    md = [f"# cmbench summary: suite `{suite}`", "", *[f"- {x}" for x in LEGEND], ""]
    tex = [TEX_HEADER, f"% cmbench summary: suite {suite}", *[f"% {x}" for x in LEGEND], ""]
    for dataset, t in per.items():
        note = _dataset_note(dataset, df[df["dataset"] == dataset], df)
        md += [f"## {dataset}", "", note, "", _md_table(t), ""]
        tex += [f"% {dataset}", _tex_table(t, f"Suite {suite}, {dataset}: {note}"), ""]
        csv_rows.append(t.reset_index().assign(dataset=dataset))
    cols = ["dataset", "variant"]
    for t in csv_rows:
        cols += [c for c in t.columns if c not in cols]
    csv = (pd.concat(csv_rows, ignore_index=True) if csv_rows else pd.DataFrame(columns=cols))
    csv = csv.reindex(columns=cols).fillna(NOT_MEASURED)
    paths = [tables / f"summary_{suite}.{ext}" for ext in ("csv", "md", "tex")]
    _csv(csv, paths[0])
    _write(paths[1], "\n".join(md))
    _write(paths[2], "\n".join(tex))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# ODE error vs sample quality (Vouitsis et al. 2024; papers.md §6)
# ---------------------------------------------------------------------------------------------------------------
ODE_ERROR = "ode_error"
CLAIM = "Direct CM has lower ODE error but worse sample quality than CD"
CD, DIRECT_CM = "cd", "direct_cm"
NAMES = {CD: "CD", DIRECT_CM: "Direct CM"}


def quality_metrics(d: pd.DataFrame) -> list[str]:
    """W2 where the data are Gaussian (exact), else the Fréchet distance and sliced W2 (mixtures)."""
    present = set(d["metric"])
    return ["w2"] if "w2" in present else [m for m in ("fd", "sliced_w2") if m in present]


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


def verdict(ode: dict, quality: dict, metric: str) -> tuple[str, str]:
    """(outcome, sentence) for the claim, from per-variant (mean, sd, n) of ODE error and quality (lower = better).
    Holds when Direct CM's ODE error is lower and its quality metric higher than CD's, both beyond the seed
    spread (mean ± sd intervals apart); does not hold when either comparison goes the other way beyond the spread;
    otherwise inconclusive."""
    missing = [NAMES[v] for v in (CD, DIRECT_CM) if v not in ode or v not in quality]
    if missing:
        return "not evaluated", f"not evaluated: no {' or '.join(missing)} records"
    o, q = _compare(ode[DIRECT_CM], ode[CD]), _compare(quality[DIRECT_CM], quality[CD])
    detail = (f"ODE error {_ms(ode[DIRECT_CM])} vs CD {_ms(ode[CD])}; "
              f"{metric} {_ms(quality[DIRECT_CM])} vs CD {_ms(quality[CD])}")
    ode_word = {"lower": "lower", "higher": "higher", "within": "similar", "unknown": "unresolved"}[o]
    q_word = {"lower": "better", "higher": "worse", "within": "similar", "unknown": "unresolved"}[q]
    if o == "lower" and q == "higher":
        return "holds", f"holds: Direct CM has lower ODE error but worse {metric} ({detail})"
    if o == "higher" or q == "lower":
        return "does not hold", f"does not hold: Direct CM has {ode_word} ODE error and {q_word} {metric} ({detail})"
    if "unknown" in (o, q):
        return "inconclusive", f"inconclusive: fewer than two seeds, no seed spread ({detail})"
    within = " and ".join(x for x, c in (("ODE-error", o), (metric, q)) if c == "within")
    return "inconclusive", f"inconclusive: {within} difference within seed spread ({detail})"


def ode_vs_quality(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """From records with an `ode_error` metric, at NFE 1 and 2: a table (dataset, NFE, quality metric, variant,
    ODE error, quality, seeds) for every variant, and one verdict on the claim per dataset, NFE and quality
    metric (columns dataset, nfe, quality_metric, outcome, verdict)."""
    table_cols = ["dataset", "NFE", "quality metric", "variant", "ODE error", "quality", "seeds"]
    verdict_cols = ["dataset", "nfe", "quality_metric", "outcome", "verdict"]
    rows, verdicts = [], []
    d = df[df["nfe"].isin([1, 2])]
    for dataset, dd in d.groupby("dataset", sort=True):
        if ODE_ERROR not in set(dd["metric"]):
            continue
        for nfe, dn in dd.groupby("nfe", sort=True):
            ode_v = dn[dn["metric"] == ODE_ERROR]
            for qm in quality_metrics(dn):
                q_v = dn[dn["metric"] == qm]
                ode, qual = {}, {}
                for variant in sorted(set(ode_v["variant"]) | set(q_v["variant"])):
                    o, q = ode_v[ode_v["variant"] == variant]["value"], q_v[q_v["variant"] == variant]["value"]
                    if len(o):
                        ode[variant] = _stats(o)
                    if len(q):
                        qual[variant] = _stats(q)
                    rows.append([dataset, int(nfe), qm, variant, _mean_sd(o), _mean_sd(q),
                                 str(len(set(ode_v[ode_v["variant"] == variant]["seed"])
                                         | set(q_v[q_v["variant"] == variant]["seed"])))])
                outcome, sentence = verdict(ode, qual, qm)
                verdicts.append([dataset, int(nfe), qm, outcome, sentence])
    return pd.DataFrame(rows, columns=table_cols), pd.DataFrame(verdicts, columns=verdict_cols)


def write_ode_vs_quality(df: pd.DataFrame, suite: str, tables: Path) -> list[Path]:
    table, verdicts = ode_vs_quality(df)
    intro = (f"Claim tested (Vouitsis et al. 2024, papers.md §6): \"{CLAIM}\". Quality: W2 for Gaussian data, "
             "Fréchet distance and sliced W2 for mixtures (lower is better). A verdict holds or fails only when "
             "the mean ± sd (over seeds) intervals of Direct CM and CD are apart. At NFE 2 the sampler re-noises with "
             "fresh noise, so the ODE error there mostly measures that noise (its ideal is n/a); the NFE 1 verdicts "
             "are the ones that test the claim.")
    lines = [f"# ODE error vs sample quality: suite `{suite}`", "", intro, ""]
    tex = [TEX_HEADER, f"% ODE error vs sample quality: suite {suite}", f"% {intro}", ""]
    if table.empty:
        lines.append("No ode_error records in this suite (toy suites only).")
        tex.append("% No ode\\_error records in this suite (toy suites only).")
    else:
        lines += ["## Verdicts", ""]
        lines += [f"- {r.dataset}, NFE {r.nfe}, {r.quality_metric}: {r.verdict}" for r in verdicts.itertuples()]
        lines += ["", "## Table", "", _md_table(table.set_index("dataset")), ""]
        tex += [r"\begin{itemize}"]
        tex += [r"\item " + tex_escape(f"{r.dataset}, NFE {r.nfe}, {r.quality_metric}: {r.verdict}")
                for r in verdicts.itertuples()]
        tex += [r"\end{itemize}", "",
                _tex_table(table.set_index("dataset"), f"Suite {suite}: ODE error vs sample quality (mean ± sd "
                           "over seeds)")]
    paths = [tables / f"ode_vs_quality_{suite}.{ext}" for ext in ("csv", "md", "tex")]
    _csv(table, paths[0])
    _write(paths[1], "\n".join(lines))
    _write(paths[2], "\n".join(tex))
    _csv(verdicts, tables / f"ode_vs_quality_verdicts_{suite}.csv")
    return paths + [tables / f"ode_vs_quality_verdicts_{suite}.csv"]


def write_tables(df: pd.DataFrame, suite: str, tables: str | Path, papers: dict) -> list[Path]:
    tables = Path(tables)
    tables.mkdir(parents=True, exist_ok=True)
    df.assign(mode=df["mode"].mask(df["mode"] == "")).to_csv(tables / "records.csv", index=False, na_rep="NA",
                                                             lineterminator="\n")
    return [tables / "records.csv", *write_summary(df, suite, papers, tables), *write_ode_vs_quality(df, suite, tables)]


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------
def _mpl():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def placeholder(path: Path, text: str) -> None:
    """A small figure that says why there is nothing to plot (the file must exist for Snakemake)."""
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(4, 1.6))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(df: pd.DataFrame, path: Path) -> None:
    """Metric vs NFE per variant (error bars: sd over seeds)."""
    plt = _mpl()
    import seaborn as sns

    d = pd.concat([_with_keys(g) for _, g in df.groupby("dataset")], ignore_index=True)
    d["panel"] = d["dataset"] + " · " + d["key"]      # only the panels that have data (datasets differ in metrics)
    order = [p for _, p in sorted({((ds, _metric_rank(m), k), p)
                                   for ds, m, k, p in zip(d["dataset"], d["metric"], d["key"], d["panel"])})]
    g = sns.catplot(d, x="nfe", y="value", hue="variant", col="panel", col_order=order,
                    col_wrap=min(5, len(order)), kind="point", errorbar="sd", sharey=False, sharex=False,
                    height=2.6, aspect=1.1,
                    dodge=0.2 if d["variant"].nunique() > 1 else False)   # seaborn divides by (hues − 1)
    g.set_titles("{col_name}")
    g.savefig(path, dpi=110)
    plt.close(g.figure)


def run_dir_of(records_file: str | Path) -> Path:
    """results/runs/{suite}/{dataset}/{variant}/s{seed}/metrics/records.json → the run dir."""
    return Path(records_file).resolve().parent.parent


def training_curves(df: pd.DataFrame) -> pd.DataFrame:
    """Tidy training statistics (loss, grad_norm vs step) of every run whose records are in df."""
    runs = df.drop_duplicates("records_file")[["records_file", "dataset", "variant", "seed"]]
    parts = []
    for f, dataset, variant, seed in runs.itertuples(index=False):
        stats = run_dir_of(f) / "stats.jsonl"
        if not stats.exists():
            continue
        s = pd.DataFrame([json.loads(line) for line in stats.read_text().splitlines() if line.strip()])
        qs = [q for q in ("loss", "grad_norm") if q in s]
        if "step" not in s or not qs:
            continue
        s = s.melt(id_vars="step", value_vars=qs, var_name="quantity").dropna()
        parts.append(s.assign(dataset=dataset, variant=variant, seed=int(seed)))
    cols = ["dataset", "variant", "seed", "step", "quantity", "value"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def plot_training(df: pd.DataFrame, path: Path) -> None:
    curves = training_curves(df)
    if curves.empty:
        return placeholder(path, "no training statistics (stats.jsonl) beside the records")
    plt = _mpl()
    import seaborn as sns

    g = sns.relplot(curves, x="step", y="value", hue="variant", units="seed", estimator=None, col="quantity",
                    row="dataset", kind="line", height=2.6, aspect=1.3, facet_kws={"sharey": False},
                    linewidth=0.9, alpha=0.8)
    for ax in g.axes.flat:        # losses span decades across variants, and sCM's adaptive weighting goes below 0
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if ys and min(ys) > 0:
            ax.set_yscale("log")
        elif any(ys):
            ax.set_yscale("symlog", linthresh=float(pd.Series([abs(y) for y in ys if y]).quantile(0.05)))
    g.set_titles("{row_name} · {col_name}")
    g.savefig(path, dpi=110)
    plt.close(g.figure)


def plot_fid_agreement(df: pd.DataFrame, path: Path) -> None:
    a = fid_agreement(df)
    if a.empty:
        has_fid = (df["metric"] == "fid").any()
        return placeholder(path, "no FID records from both torch-fidelity and clean-fid on the same samples"
                           if has_fid else "no FID records")
    plt = _mpl()
    import seaborn as sns

    a = a.assign(mode=a["mode"].replace("", "default"))
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    sns.scatterplot(a, x="tf", y="cf", hue="mode", style="dataset", ax=ax)
    lo, hi = min(a["tf"].min(), a["cf"].min()), max(a["tf"].max(), a["cf"].max())
    pad = 0.05 * (hi - lo or 1)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, ls="--", label="y = x")
    ax.set(xlabel="FID, torch-fidelity", ylabel="FID, clean-fid")
    worst = ", ".join(f"{m} {100 * g['rel_diff'].max():.2g}%" for m, g in a.groupby("mode", sort=True))
    ax.set_title(f"FID library agreement\nmax relative difference: {worst}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ode_vs_quality(df: pd.DataFrame, path: Path) -> None:
    """Per-seed points: ODE error (x) vs quality (y), one panel per dataset · quality metric and NFE."""
    d = df[df["nfe"].isin([1, 2])]
    points = []
    for dataset, dd in d.groupby("dataset", sort=True):
        if ODE_ERROR not in set(dd["metric"]):
            continue
        ode = dd[dd["metric"] == ODE_ERROR][["variant", "seed", "nfe", "value"]].rename(columns={"value": "ode"})
        for qm in quality_metrics(dd):
            q = dd[dd["metric"] == qm][["variant", "seed", "nfe", "value"]].rename(columns={"value": "quality"})
            points.append(ode.merge(q, on=["variant", "seed", "nfe"]).assign(panel=f"{dataset} · {qm}"))
    if not points:
        return placeholder(path, "no ode_error records (ODE error vs quality is a toy-suite study)")
    p = pd.concat(points, ignore_index=True)
    plt = _mpl()
    import seaborn as sns

    panels, nfes = sorted(p["panel"].unique()), sorted(p["nfe"].unique())
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(len(panels), len(nfes), figsize=(3.6 * len(nfes) + 1.2, 3.0 * len(panels)),
                             squeeze=False, layout="constrained")
    variants = sorted(p["variant"].unique())
    palette = dict(zip(variants, sns.color_palette("tab10", len(variants))))
    for i, panel in enumerate(panels):
        for j, nfe in enumerate(nfes):
            ax, s = axes[i][j], p[(p["panel"] == panel) & (p["nfe"] == nfe)]
            for v, g in s.groupby("variant"):
                focus = v in NAMES
                ax.scatter(g["ode"], g["quality"], color=palette[v], s=60 if focus else 18,
                           marker="D" if focus else "o", edgecolor="black" if focus else "none",
                           alpha=1 if focus else 0.6, label=NAMES.get(v, v), zorder=3 if focus else 2)
            for col, axis, scale in (("ode", ax.xaxis, ax.set_xscale), ("quality", ax.yaxis, ax.set_yscale)):
                v = s[col]
                if len(v) and v.min() > 0 and v.max() / v.min() > 10:   # log only over more than a decade
                    scale("log")
                    axis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=7)
            ax.set(xlabel="ODE error", ylabel=panel.split(" · ")[1], title=f"{panel} · NFE {nfe}")
            ax.title.set_fontsize(9)
    handles = {h.get_label(): h for ax in axes.flat for h in ax.get_legend_handles_labels()[0]}
    fig.legend(handles.values(), handles.keys(), loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------
def report_outputs(suite: str, tables: str | Path, plots: str | Path) -> list[Path]:
    """Every file `report` writes for a suite (a pure function of the names: Snakemake's rule outputs)."""
    tables, plots = Path(tables), Path(plots)
    return ([tables / "records.csv"]
            + [tables / f"summary_{suite}.{ext}" for ext in ("csv", "md", "tex")]
            + [tables / f"ode_vs_quality_{suite}.{ext}" for ext in ("csv", "md", "tex")]
            + [tables / f"ode_vs_quality_verdicts_{suite}.csv"]
            + [plots / f"{suite}_{name}.png" for name in ("metrics", "training", "fid_agreement", "ode_vs_quality")])


def report(suite: str, files, tables: str | Path, plots: str | Path,
           paper_numbers: str | Path | None = None) -> list[Path]:
    """Tables and plots of a suite's metric records; returns `report_outputs(suite, tables, plots)`.
    paper_numbers: the reported-numbers file (default configs/paper_numbers.yaml, from the working directory,
    else the one beside the package); needed only when records of cifar10 / imagenet64 are present."""
    tables, plots = Path(tables), Path(plots)
    plots.mkdir(parents=True, exist_ok=True)
    df = load_records(files)
    path = Path(paper_numbers) if paper_numbers is not None else _default_paper_numbers()
    if path is None and df["dataset"].isin(PAPER_DATASETS).any():
        raise ConfigError(f"records of {', '.join(PAPER_DATASETS)} need the reported numbers: "
                          f"{DEFAULT_PAPER_NUMBERS} not found (pass --paper-numbers)")
    papers = primary_numbers(load_paper_numbers(path)) if path is not None else {}
    written = write_tables(df, suite, tables, papers)
    out = report_outputs(suite, tables, plots)
    plot(df, out[-4])
    plot_training(df, out[-3])
    plot_fid_agreement(df, out[-2])
    plot_ode_vs_quality(df, out[-1])
    assert set(written + out[-4:]) == set(out), "report_outputs is out of date"
    return out
