"""`cmbench settings`: the resolved settings of a paper suite beside the values the papers state.

configs/paper_settings.yaml lists, per dataset and variant, settings by their config path (`optim.lr`,
`sample.sigmas.2`, ...) with the paper's value, its source and its status (papers.md §0.2: confirmed, secondary,
unverified). Each row is marked ✓ (ours equals the paper's), ✗ (it differs: the variant YAML says why), unverified
(ours equals a paper value that is itself not confirmed; "✗ (unverified)" where it differs from one) or "not stated"
(no source gives one)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cmbench.config import ConfigError, Experiment, RunConfig, load_yaml
from cmbench.checks import check_run

STATUSES = ("confirmed", "secondary", "unverified")
NOT_STATED = "not stated"


def load_paper_settings(path: str | Path) -> dict[str, dict[str, dict[str, dict]]]:
    """dataset → variant → setting path → {paper, source, status}, validated."""
    path = Path(path)
    data = load_yaml(path)
    for dataset, variants in data.items():
        if not isinstance(variants, dict):
            raise ConfigError(f"{path}: {dataset} must map variants to their settings")
        for variant, rows in variants.items():
            if not isinstance(rows, dict):
                raise ConfigError(f"{path}: {dataset}.{variant} must map setting paths to entries")
            for key, row in rows.items():
                where = f"{path}: {dataset}.{variant}.{key}"
                if not isinstance(row, dict) or set(row) - {"paper", "source", "status"} or "paper" not in row \
                        or not isinstance(row.get("source"), str):
                    raise ConfigError(f"{where}: must be a mapping with 'paper', 'source' and optionally 'status'")
                row.setdefault("status", "confirmed")
                if row["status"] not in STATUSES:
                    raise ConfigError(f"{where}: status {row['status']!r} is not one of {', '.join(STATUSES)}")
    return data


def setting(cfg: RunConfig, key: str) -> Any:
    """The value at a dotted path of the resolved config (`sample.sigmas.2` reads the NFE-2 σ list)."""
    node: Any = cfg.to_dict()
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"paper_settings: {cfg.run.variant}: no setting {key!r} in the resolved config")
        node = node[part]
    return node


def same(ours: Any, paper: Any) -> bool:
    """Equal, with floats compared to 1e-6 relative (half-lives converted to per-step decays, σ from t)."""
    if isinstance(paper, list) and isinstance(ours, list):
        return len(ours) == len(paper) and all(same(a, b) for a, b in zip(ours, paper))
    if isinstance(paper, bool) or isinstance(ours, bool):
        return ours is paper
    if isinstance(paper, (int, float)) and isinstance(ours, (int, float)):
        return math.isclose(ours, paper, rel_tol=1e-6, abs_tol=1e-12)
    return ours == paper


def mark(ours: Any, row: dict) -> str:
    if row["paper"] is None:
        return NOT_STATED
    ok = same(ours, row["paper"])
    if row["status"] == "unverified":
        return "unverified" if ok else "✗ (unverified)"
    return "✓" if ok else "✗"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.10g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return "—" if v is None else str(v)


def settings_table(suite: str, configs: str | Path = "configs", paper_settings: str | Path | None = None,
                   scale: str | None = None) -> str:
    """A Markdown table per dataset of the suite: variant, setting, ours, paper, mark, source."""
    exp = Experiment(configs)
    s = exp.suite(suite)
    table = load_paper_settings(paper_settings or Path(configs) / "paper_settings.yaml")
    out, counts = [], {}
    for dataset in s["datasets"]:
        rows = table.get(dataset)
        if rows is None:
            raise ConfigError(f"paper_settings: no settings listed for dataset {dataset!r}")
        out += [f"## {dataset}" + (f" (scale {scale})" if scale else ""), "",
                "| variant | setting | ours | paper | | source |", "|---|---|---|---|---|---|"]
        for variant in s["variants"]:
            # the dataset's files play no part in the settings listed: they are not checked
            cfg = check_run(exp.resolve(suite, dataset, variant, s["seeds"][0], scale=scale), data=False)
            for key, row in rows.get(variant, {}).items():
                ours = setting(cfg, key)
                m = mark(ours, row)
                counts[m] = counts.get(m, 0) + 1
                paper = _fmt(row["paper"]) + ("" if row["status"] == "confirmed" or row["paper"] is None
                                              else f" ({row['status']})")
                out.append(f"| {variant} | `{key}` | {_fmt(ours)} | {paper} | {m} | {row['source']} |")
        out.append("")
    summary = ", ".join(f"{counts[k]} {k}" for k in ("✓", "✗", "unverified", "✗ (unverified)", NOT_STATED)
                        if counts.get(k))
    head = [f"# Settings of suite `{suite}` beside the papers", "",
            f"{summary}. ✗ rows are deviations; each is explained in the variant's YAML (configs/variants/).", ""]
    return "\n".join(head + out)
