"""The sample pictures (cmbench.report.pictures) on hand-made run dirs: a run's config.json and sample files are
all the pictures read (toy: and the cached reference), so no model is trained here. The workflow writes them too:
test_html_report.py (toy, in the HTML report) and test_image_suite.py (digits)."""
import re
import subprocess
import sys

import numpy as np
import pytest

from cmbench import io, paths
from cmbench.checks import check_run
from cmbench.config import Experiment, parse_overrides, write_run_config
from cmbench.metrics.evaluate import build_reference, reference_path
from cmbench.report import pictures
from cmbench.report.outputs import picture_files
from cmbench.seeds import initial_noise, sample_seeds
from conftest import REPO


def make_run(results, suite, dataset, variant, sets):
    cfg = check_run(Experiment(REPO / "configs").resolve(suite, dataset, variant, 0, parse_overrides(sets)))
    rdir = paths.run_dir(results, cfg.run)
    write_run_config(cfg, rdir)
    return cfg, rdir


def gaussian_endpoints(cfg, nfe):
    """The exact consistency map of N(μ, s²) from σ_0 to σ_min in closed form: μ + √(s²+σ_min²)/√(s²+σ_0²)·(x_T − μ)."""
    mu, s = cfg.dataset.mean, cfg.dataset.std
    sigma, sigma_min = cfg.sigma_list(nfe)[0], cfg.precond.sigma_min
    return mu + np.sqrt(s**2 + sigma_min**2) / np.sqrt(s**2 + sigma**2) * (initial_noise(cfg, nfe) - mu)


def seed_code(seeds, nfe):
    """The grey level of a hand-made image: which seed and NFE it was made for."""
    return ((seeds * 7 + nfe) % 251).astype(np.uint8)


@pytest.fixture
def runs(tmp_path):
    """gauss1d runs of a perfect sampler (its samples are the closed-form endpoints) with 200 and 300 samples, and
    digits runs with 80 and 100 images (each image a flat grey that encodes its seed and NFE), all from seed 0."""
    results = tmp_path / "results"
    toy = []
    for variant, n in (("ict", 200), ("cd", 300)):
        cfg, rdir = make_run(results, "toy", "gauss1d", variant,
                             [f"sample.n={n}", "evaluate.ref_n=200", "evaluate.floor_repeats=1"])
        for nfe in cfg.sample.nfe:
            build_reference(cfg, nfe, reference_path(cfg, nfe, results))
            io.save_npz(paths.samples_file(rdir, nfe), seeds=sample_seeds(cfg), x_t=initial_noise(cfg, nfe),
                     samples=gaussian_endpoints(cfg, nfe))
        toy.append(rdir)
    digits = []
    for variant, n in (("edm", 80), ("ict", 100)):
        cfg, rdir = make_run(results, "digits", "digits", variant, [f"sample.n={n}"])
        for nfe in cfg.sample.nfe:
            images = np.broadcast_to(seed_code(sample_seeds(cfg), nfe)[:, None, None, None], (n, 8, 8, 1))
            io.save_npz(paths.samples_file(rdir, nfe), seeds=sample_seeds(cfg), images=images)
        digits.append(rdir)
    return toy, digits


def test_each_toy_sample_is_paired_with_the_exact_endpoint_of_its_own_noise(runs):
    """A perfect sampler's samples lie on their exact endpoints Φ(x_T) (closed form for a Gaussian), in every panel,
    the second run's (300 samples) looked up by the first run's seeds (200)."""
    toy, _ = runs
    panels = pictures.load_panels(toy, [pictures.load_run_config(r) for r in toy], None)
    assert [(p.variant, p.nfe) for p in panels] == [("ict", 1), ("ict", 2), ("cd", 1), ("cd", 2)]
    assert [p.deterministic for p in panels] == [True, False, True, False]   # 2 steps re-noise: no segment drawn
    for p in panels:
        assert np.array_equal(p.seeds, np.arange(200)) and p.samples.shape == p.exact.shape == (200, 1)
        np.testing.assert_allclose(p.samples, p.exact, atol=1e-6)   # x_T ≈ 80: float64 rounding


def test_image_grids_show_the_same_seeds_in_every_panel_and_need_no_torch(runs, tmp_path):
    """The CLI (what the workflow runs) draws both datasets without importing torch; every panel of the digits grid
    records the same 64 seeds and shows, at each tile position, the image of that seed."""
    toy, digits = runs
    code = ("import sys; from cmbench.report.pictures import main; main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code, "--plots", str(tmp_path / "plots"), *map(str, toy)], check=True)
    subprocess.run([sys.executable, "-c", code, "--plots", str(tmp_path / "plots"), *map(str, digits)], check=True)
    for suite, dataset in (("toy", "gauss1d"), ("digits", "digits")):
        png, _ = picture_files(tmp_path / "plots", suite, dataset)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _, source = picture_files(tmp_path / "plots", "digits", "digits")
    src = np.load(source)
    assert list(zip(src["variant"], src["nfe"])) == [("edm", 35), ("ict", 1), ("ict", 2)]
    assert all(np.array_equal(row, np.arange(64)) for row in src["seeds"])     # one noise per column, every variant
    assert np.array_equal(src["real_index"], np.arange(pictures.STRIP))
    assert [str(r) for r in src["run"]] == [str(r) for r in [digits[0], digits[1], digits[1]]]
    for p in pictures.load_panels(digits, [pictures.load_run_config(r) for r in digits], pictures.GRID):
        grid = pictures.mosaic(p.samples, 8)             # 8 × 8 tiles of 8 px with 1 px gaps
        tiles = grid[::9, ::9, 0]                          # each tile's top-left pixel, in reading order
        assert np.array_equal(tiles.ravel(), seed_code(np.arange(64), p.nfe))


def test_a_run_without_the_shown_seeds_is_one_line(runs, tmp_path):
    """Pictures compare variants seed by seed: a run sampled from other seeds is refused, naming its file and the fix."""
    _, digits = runs
    cfg, rdir = make_run(tmp_path / "other", "digits", "digits", "ict", ["sample.n=100", "sample.seed_start=10"])
    for nfe in cfg.sample.nfe:
        io.save_npz(paths.samples_file(rdir, nfe), seeds=sample_seeds(cfg), images=np.zeros((100, 8, 8, 1), np.uint8))
    with pytest.raises(SystemExit, match=r"nfe1.npz: has no sample seed 0, .*same sample.seed_start"):
        pictures.main(["--plots", str(tmp_path / "plots"), str(digits[0]), str(rdir)])


def test_the_readme_shows_small_committed_pictures():
    """The README's pictures exist under docs/, each under 150 KB (a 64-colour palette: `--colors 64`), each with
    its source npz beside it."""
    from PIL import Image

    shown = re.findall(r"\]\((docs/[^)]+\.png)\)", (REPO / "README.md").read_text())
    assert sorted(shown) == ["docs/digits_digits_samples.png", "docs/toy_ring2d_samples.png"]
    for name in shown:
        png = REPO / name
        assert png.stat().st_size < 150_000 and png.with_suffix(".npz").is_file(), name
        with Image.open(png) as im:
            assert im.mode == "P" and len(im.getcolors()) <= 64, name
