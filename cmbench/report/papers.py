"""Reported numbers (configs/paper_numbers.yaml), loaded and validated into plain Python data. Imports no pandas:
the workflow loads the file while Snakemake parses it, to stop early on a bad entry."""
from __future__ import annotations

import math
import re
from pathlib import Path

import yaml

from cmbench.config import ConfigError, parse_yaml

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


def _check_values(e: dict, label: str) -> None:
    """The entry's dataset, status, NFE, value and texts."""
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


def _check_variant(e: dict, label: str, variants: set[str] | None) -> None:
    """The variant our runs compare with the entry (or null), and whether the entry is its primary number."""
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


def _check_entry(e, i: int, protocols: dict, variants: set[str] | None, where: str) -> dict:
    """One entry, checked, with its protocol resolved (a name in `protocols`, or a mapping written inline)."""
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: entries[{i}] must be a mapping")
    label = f"{where}: entries[{i}] ({e.get('dataset')} {e.get('method')!r} NFE {e.get('nfe')})"
    missing = [k for k in ENTRY_REQUIRED if k not in e]
    if missing:
        raise ConfigError(f"{label}: missing field(s) {', '.join(missing)}")
    unknown = sorted(set(e) - set(ENTRY_REQUIRED) - set(ENTRY_OPTIONAL))
    if unknown:
        raise ConfigError(f"{label}: unknown field(s) {', '.join(unknown)}")
    _check_values(e, label)
    _check_variant(e, label, variants)
    proto = e["protocol"]
    if isinstance(proto, str):
        if proto not in protocols:
            raise ConfigError(f"{label}: unknown protocol {proto!r} (not in `protocols`)")
        name, proto = proto, protocols[proto]
    else:
        name, proto = "inline", _check_protocol(proto, f"{label}: protocol")
    return {"dataset": e["dataset"], "method": e["method"], "variant": e["variant"], "model": e.get("model"),
            "nfe": e["nfe"], "metric": e["metric"], "value": float(e["value"]), "primary": e.get("primary", False),
            "status": e["status"], "citation": e["citation"], "protocol_name": name, "protocol": proto,
            "budget": e["budget"], "source": e["source"], "note": e.get("note")}


def _check_unique(entries: list[dict], path: Path) -> None:
    """No entry twice, and exactly one primary entry per (dataset, variant, metric, NFE) that names a variant."""
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


def load_paper_numbers(path: str | Path, variants: set[str] | None = None) -> list[dict]:
    """The validated reported numbers, one dict per entry (`protocol` holds the resolved protocol mapping).
    `variants`: the known variant names (default: configs/variants/*.yaml beside the file, where that exists).
    A bad file raises ConfigError with a one-line message naming the entry."""
    path = Path(path)
    try:
        data = parse_yaml(path.read_text())
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
    _check_unique(entries, path)
    return entries


def primary_numbers(entries: list[dict]) -> dict[tuple, dict]:
    """(dataset, variant, metric, nfe) → the primary entry."""
    return {(e["dataset"], e["variant"], e["metric"], e["nfe"]): e for e in entries if e["primary"]}


def default_paper_numbers() -> Path | None:
    """configs/paper_numbers.yaml from the working directory, else the one of the checkout beside the package."""
    for p in (DEFAULT_PAPER_NUMBERS, Path(__file__).resolve().parents[2] / DEFAULT_PAPER_NUMBERS):
        if p.exists():
            return p
    return None
