"""Sample pictures: what a reader looks at before any number. One figure per dataset of a suite (file names:
cmbench.report.outputs.picture_files), a panel per variant (rows; its run of the first training seed given) and
NFE (columns), every panel showing the same sample seeds (seeds do not depend on the variant: cmbench.seeds):

- toy data of 2+ dimensions: the first SCATTER_POINTS samples over the exact endpoints Φ(x_T) of the same initial
  noise (the cached toy reference the samples were scored against), the first PAIRED joined to their own
  endpoint where the sampler is deterministic (one step, or an ODE solver; a re-noised sample has no such
  partner), the law's modes marked (first two coordinates);
- 1-D toy data: a histogram of the samples over the exact density;
- images: the first GRID samples as a square grid (a tile position shows one noise through every method), the
  teacher's row first, and a strip of the first STRIP training images.

Beside each PNG an npz records what it shows: per panel the run, variant, NFE, sample file and sample seeds
(`seeds`, one row per panel), and for images the indices of the real training images. numpy, matplotlib and
Pillow, no torch:

    python -m cmbench.report.pictures --plots DIR [--colors N] RUN [RUN ...]   # RUN: e.g. results/runs/toy/ring2d/*/s0
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from PIL import Image

from cmbench import io, paths
from cmbench.config import ConfigError, RunConfig, load_run_config
from cmbench.data.images import load_images
from cmbench.data.toy import GaussianMixture, make_toy
from cmbench.errors import DamagedFile
from cmbench.metrics.evaluate import reference_path
from cmbench.metrics.files import read_npz
from cmbench.report.outputs import picture_files, picture_kind
from cmbench.report.plots import _save as save_figure

# report/samples_*.rst quote these numbers
SCATTER_POINTS = 1000   # toy scatter: samples shown per panel
PAIRED = 60             # of which joined to their exact endpoint Φ(x_T)
GRID = 64               # images: samples per panel (8 × 8)
STRIP = 16              # real training images below the grids
DPI = 110               # plots._save's: image panels are sized to show each pixel at least once


@dataclass
class Panel:
    variant: str
    nfe: int
    run: Path
    file: Path               # the sample file
    seeds: np.ndarray        # the sample seeds shown
    samples: np.ndarray      # toy: float [k, d]; images: uint8 [k, H, W, C]
    exact: np.ndarray | None = None     # toy: Φ(x_T) of the same seeds
    deterministic: bool = True          # one step or an ODE solver: a sample is its model's image of Φ(x_T)


def _rows(have: np.ndarray, want: np.ndarray, path: Path) -> np.ndarray:
    """Where the seeds `want` are in a sample file's seeds: every panel shows the same seeds."""
    where = {int(s): i for i, s in enumerate(have)}
    missing = [int(s) for s in want if int(s) not in where]
    if missing:
        raise ConfigError(f"{path}: has no sample seed {missing[0]}, which the other variants' pictures show "
                          f"(give every run of the suite the same sample.seed_start and sample.n)")
    return np.array([where[int(s)] for s in want], dtype=np.int64)


def load_panels(runs: list[Path], cfgs: list[RunConfig], shown: int | None) -> list[Panel]:
    """One panel per run and NFE, each with the first run's first `shown` sample seeds (None: all of them)."""
    panels, seeds = [], None
    for rdir, cfg in zip(runs, cfgs):
        image = picture_kind(cfg.dataset) == "images"
        for nfe in cfg.sample.nfe:
            path = paths.samples_file(rdir, nfe)
            smp = read_npz(path, ("seeds", "images") if image else ("seeds", "samples", "x_t"))
            seeds = smp["seeds"][:shown] if seeds is None else seeds
            rows = _rows(smp["seeds"], seeds, path)
            p = Panel(cfg.run.variant, nfe, rdir, path, seeds, smp["images" if image else "samples"][rows],
                      deterministic=cfg.deterministic(nfe))
            if not image:   # the exact endpoints evaluation scored these samples against, row for row
                ref_file = reference_path(cfg, nfe, paths.results_of(rdir))
                ref = read_npz(ref_file, ("x_t", "exact"), fix="delete it and re-run snakemake (it is rebuilt)")
                if not np.array_equal(ref["x_t"], smp["x_t"]):
                    raise DamagedFile(f"{ref_file}: its initial noise differs from {path}'s; delete it and "
                                      f"re-run snakemake (it is rebuilt)")
                p.exact = ref["exact"][rows]
            panels.append(p)
    return panels


def _figure(rows: list[str], cols: list[int], panel: tuple[float, float], strip: float = 0.0):
    """A figure of len(rows) × len(cols) axes, keyed (row, column), and below them, when strip > 0, one axis
    across the whole width, `strip` inches high."""
    w, h = panel
    fig = plt.figure(figsize=(0.3 + w * len(cols), 0.9 + h * len(rows) + strip), layout="constrained")
    gs = fig.add_gridspec(len(rows) + (strip > 0), len(cols), height_ratios=[h] * len(rows) + [strip] * (strip > 0))
    axes = {(r, c): fig.add_subplot(gs[i, j]) for i, r in enumerate(rows) for j, c in enumerate(cols)}
    for ax in axes.values():
        ax.set_axis_off()       # turned on where a panel has data
    return fig, axes, (fig.add_subplot(gs[-1, :]) if strip > 0 else None)


def _title(p: Panel, teachers: set[str]) -> str:
    return f"{p.variant}{' (teacher)' if p.variant in teachers else ''} · NFE {p.nfe}"


def _components(dist) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means [K, d], stds [K], weights [K]) of a toy law; a Gaussian is one component."""
    if isinstance(dist, GaussianMixture):
        return dist.means, dist.stds, dist.weights
    return dist.mean[None], np.array([dist.std]), np.ones(1)


def _off(ax, n: int, total: int) -> None:
    if n:
        ax.text(0.02, 0.02, f"{n} of {total} off the panel", transform=ax.transAxes, fontsize=7, color="C3")


def draw_scatter(panels: list[Panel], cfg: RunConfig, grid, teachers: set[str]) -> tuple:
    """Samples (blue) over the exact endpoints of the same noise (grey), PAIRED of them joined, modes ×."""
    fig, axes, _ = grid((2.2, 2.2))
    means, stds, _ = _components(make_toy(cfg.dataset.model_dump()))
    exact = np.concatenate([p.exact[:, :2] for p in panels] + [means[:, :2] - 3 * stds[:, None],
                                                                 means[:, :2] + 3 * stds[:, None]])
    lo, hi = exact.min(0), exact.max(0)
    lo, hi = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
    for p in panels:
        ax, x, e = axes[(p.variant, p.nfe)], p.samples[:, :2], p.exact[:, :2]
        ax.set_axis_on()
        ax.scatter(*e.T, s=3, c="0.7", lw=0)
        k = min(PAIRED, len(x)) if p.deterministic else 0    # a re-noised sample is no image of its Φ(x_T)
        ax.plot([x[:k, 0], e[:k, 0]], [x[:k, 1], e[:k, 1]], c="0.35", lw=0.4)
        ax.scatter(*x.T, s=3, c="C0", lw=0)
        ax.scatter(*means[:, :2].T, marker="x", s=40, c="C3", lw=1.5)
        ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), aspect="equal", xticks=[], yticks=[])
        ax.set_title(_title(p, teachers), fontsize=9)
        _off(ax, int((~((x >= lo) & (x <= hi)).all(1)).sum()), len(x))
    keys = [Line2D([], [], ls="", marker="o", ms=4, c="0.7", label="exact Φ(x_T), same noise"),
            Line2D([], [], ls="", marker="o", ms=4, c="C0", label="samples"),
            Line2D([], [], c="0.35", lw=0.6, label=f"the first {PAIRED}: sample – its Φ(x_T) (no re-noising)"),
            Line2D([], [], ls="", marker="x", ms=7, mew=1.5, c="C3", label="modes")]
    fig.legend(handles=keys, loc="outside lower center", ncols=2, fontsize=8)
    return fig, {}


def draw_histogram(panels: list[Panel], cfg: RunConfig, grid, teachers: set[str]) -> tuple:
    """Histogram of the samples over the exact density."""
    fig, axes, _ = grid((2.4, 1.7))
    means, stds, weights = _components(make_toy(cfg.dataset.model_dump()))
    m, s = means[:, 0], stds
    edges = np.linspace((m - 4 * s).min(), (m + 4 * s).max(), 61)
    x = np.linspace(edges[0], edges[-1], 400)
    density = (weights * np.exp(-0.5 * ((x[:, None] - m) / s) ** 2) / (s * np.sqrt(2 * np.pi))).sum(1)
    for p in panels:
        ax, v = axes[(p.variant, p.nfe)], p.samples[:, 0]
        ax.set_axis_on()
        ax.hist(v, bins=edges, density=True, color="C0", alpha=0.6, label=f"samples (n={len(v)})")
        ax.plot(x, density, c="k", lw=1.2, label="exact density")
        ax.set(yticks=[], xlim=(edges[0], edges[-1]), ylim=(0, 2 * density.max()))   # a collapsed spike is cut
        ax.tick_params(labelsize=7)
        ax.set_title(_title(p, teachers), fontsize=9)
        _off(ax, int(((v < edges[0]) | (v > edges[-1])).sum()), len(v))
    first = axes[(panels[0].variant, panels[0].nfe)]
    fig.legend(*first.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
    return fig, {}


def mosaic(images: np.ndarray, cols: int) -> np.ndarray:
    """uint8 [k, H, W, C] → one uint8 [rows·(H+1)−1, cols·(W+1)−1, C] image of tiles in reading order, white gaps."""
    k, h, w, c = images.shape
    rows = -(-k // cols)
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1, c), 255, np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        out[r * (h + 1):r * (h + 1) + h, q * (w + 1):q * (w + 1) + w] = im
    return out


def _show(ax, image: np.ndarray) -> None:
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")


def real_strip(cfg: RunConfig) -> np.ndarray:
    """The first STRIP training images (the loader reads no more than those)."""
    n = min(STRIP, cfg.dataset.size or STRIP)
    return load_images(cfg.dataset.model_copy(update={"size": n}))[0][:n]


def draw_images(panels: list[Panel], cfg: RunConfig, grid, teachers: set[str]) -> tuple:
    """A grid of the first GRID samples per panel, the same seeds in each; the real strip below."""
    side = int(np.sqrt(GRID))
    tiles = [mosaic(p.samples, side) for p in panels]
    inches = max(2.2, tiles[0].shape[1] / DPI)
    real_images = real_strip(cfg)
    real = mosaic(real_images, STRIP)
    fig, axes, strip_ax = grid((inches, inches + 0.25), strip=0.3 + inches * real.shape[0] / tiles[0].shape[1])
    for p, t in zip(panels, tiles):
        ax = axes[(p.variant, p.nfe)]
        _show(ax, t)
        ax.set_title(_title(p, teachers), fontsize=9)
    _show(strip_ax, real)
    strip_ax.set_axis_off()
    strip_ax.set_title(f"real training images (the first {len(real_images)})", fontsize=9)
    return fig, {"real_index": np.arange(len(real_images))}


# each returns the figure and any arrays its source npz adds
DRAW = {"scatter": draw_scatter, "histogram": draw_histogram, "images": draw_images}
SHOWN = {"scatter": SCATTER_POINTS, "histogram": None, "images": GRID}    # seeds per panel (None: all)
TOY_TITLE = {"scatter": "samples over the exact PF-ODE endpoints Φ(x_T) of the same noise",
             "histogram": "samples over the exact density"}


def draw_dataset(runs: list[Path], cfgs: list[RunConfig], plots: Path, teachers: set[str],
                 colors: int | None = None) -> list[Path]:
    """The picture of one dataset's runs (one per variant) and its source npz; colors: a palette of that many
    colours instead of full colour (a small file, for the README)."""
    cfg = cfgs[0]
    kind = picture_kind(cfg.dataset)
    panels = load_panels(runs, cfgs, SHOWN[kind])
    variants = [p.variant for p in panels]
    rows = sorted(dict.fromkeys(variants), key=lambda v: v not in teachers)     # the teacher first
    cols = sorted({p.nfe for p in panels})

    def grid(panel, strip=0.0):
        return _figure(rows, cols, panel, strip)

    fig, extra = DRAW[kind](panels, cfg, grid, teachers)
    seeds = sorted({c.run.seed for c in cfgs})
    what = TOY_TITLE.get(kind, f"the first {len(panels[0].seeds)} samples, the same seeds in every panel")
    fig.suptitle(f"{cfg.run.suite} · {cfg.run.dataset} (training seed {', '.join(map(str, seeds))})\n{what}",
                 fontsize=9)
    png, source = picture_files(plots, cfg.run.suite, cfg.run.dataset)
    save_figure(fig, png)
    if colors:
        with Image.open(png) as im:
            small = im.convert("RGB").quantize(colors)
        io.atomic_write(png, lambda tmp: small.save(tmp, format="PNG", optimize=True))
    arrays = {"seeds": np.stack([p.seeds for p in panels]), "variant": np.array(variants),
              "nfe": np.array([p.nfe for p in panels]), "run": np.array([str(p.run) for p in panels]),
              "sample_file": np.array([str(p.file) for p in panels]), "suite": cfg.run.suite,
              "dataset": cfg.run.dataset, "kind": kind, **extra}
    io.atomic_write(source, lambda tmp: np.savez_compressed(tmp, **arrays))
    return [png, source]


def draw(runs: list[Path], plots: str | Path, colors: int | None = None) -> list[Path]:
    """The pictures (and their sources) of every dataset of `runs`, all of one suite; each dataset × variant
    shows the first of its runs given (colors: see draw_dataset)."""
    chosen: dict[tuple[str, str], tuple[Path, RunConfig]] = {}
    for rdir in map(Path, runs):
        cfg = load_run_config(rdir)
        chosen.setdefault((cfg.run.dataset, cfg.run.variant), (rdir, cfg))
    suites = {cfg.run.suite for _, cfg in chosen.values()}
    if len(suites) > 1:
        raise ConfigError(f"runs of suites {', '.join(sorted(suites))}: draw one suite's runs at a time")
    # a variant that another run distils or starts from (cmbench.config.Teacher, source run)
    teachers = {c.teacher.variant for _, c in chosen.values() if c.teacher is not None and c.teacher.source == "run"}
    out = []
    for dataset in dict.fromkeys(d for d, _ in chosen):
        runs_cfgs = [rc for (d, _), rc in chosen.items() if d == dataset]
        out += draw_dataset([r for r, _ in runs_cfgs], [c for _, c in runs_cfgs], Path(plots), teachers, colors)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cmbench.report.pictures", description=__doc__.split("\n\n")[0])
    p.add_argument("--plots", required=True, type=Path, help="folder for the pictures and their source npz files")
    p.add_argument("--colors", type=int, help="save with a palette of this many colours (README pictures: 64)")
    p.add_argument("runs", nargs="+", type=Path, help="run directories (of one suite)")
    a = p.parse_args(argv)
    try:
        for path in draw(a.runs, a.plots, a.colors):
            print(path)
    except (ConfigError, DamagedFile) as e:
        sys.exit(f"cmbench: error: {e}")


if __name__ == "__main__":
    main()
