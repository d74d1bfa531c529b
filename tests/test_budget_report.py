"""Quality against training budget (cmbench.report.budget): the matched-budget table, images to reach a quality,
the learning-curve plots, and the cases without intermediate checkpoints.

The fixture records are written by hand with values chosen so that every expected number is exact in binary
(sums and halves of powers of two): dataset ring2d has the teacher `edm` (NFE 35) evaluated at steps 100–300,
`cd` (NFE 1) at 100–400 and `ict` (NFE 1 and 2) at 200–500, two seeds each, batch 100, so the image counts common
to all three are 20,000 and 30,000; gauss1d has no teacher, so its thresholds come from the ideal values."""
import json

import pandas as pd
import pytest
from regen_golden import FIXTURES

from cmbench.metrics.keys import NEAR_MODE, ODE_ERROR, SLICED_W2, W2
from cmbench.report import budget, report_outputs
from cmbench.report.records import load_records

BATCH = 100
FLOPS_PER_STEP = {"edm": None, "cd": 3e9, "ict": 2e9}     # the teacher has no FLOP estimate
# (dataset, variant, nfe, metric, ideal) → {step: [value of seed 0, value of seed 1]}
VALUES = {
    ("ring2d", "edm", 35, SLICED_W2, 0.0625): {100: [2, 2], 200: [1, 1], 300: [0.125, 0.375]},   # final 0.25
    ("ring2d", "cd", 1, SLICED_W2, 0.0625): {100: [4, 4], 200: [2, 3], 300: [1, 1], 400: [0.75, 0.75]},
    ("ring2d", "ict", 1, SLICED_W2, 0.0625): {200: [1, 2], 300: [0.5, 0.5], 400: [0.25, 0.25], 500: [0.125, 0.125]},
    ("ring2d", "ict", 2, SLICED_W2, 0.0625): {200: [0.5, 1], 300: [0.25, 0.25], 400: [0.125, 0.125],
                                              500: [0.0625, 0.0625]},
    ("ring2d", "edm", 35, NEAR_MODE, 0.9921875): {100: [0.25, 0.25], 200: [0.5, 0.5], 300: [0.75, 0.75]},
    ("ring2d", "cd", 1, NEAR_MODE, 0.9921875): {100: [0.25, 0.25], 200: [0.25, 0.5], 300: [0.5, 0.5],
                                                400: [0.5, 0.5]},
    ("ring2d", "ict", 1, NEAR_MODE, 0.9921875): {200: [0.125, 0.125], 300: [0.125, 0.25], 400: [0.25, 0.25],
                                                 500: [0.25, 0.25]},
    ("gauss1d", "cd", 1, W2, 0.125): {100: [1, 1], 200: [0.25, 0.25]},
    ("gauss1d", "ict", 1, W2, 0.125): {100: [0.5, 0.5], 200: [0.5, 0.5]},
    ("gauss1d", "cd", 1, ODE_ERROR, 0.0): {100: [1, 1], 200: [0.5, 0.5]},      # one exact step: no error
    ("gauss1d", "ict", 1, ODE_ERROR, 0.0): {100: [1, 1], 200: [0.5, 0.5]},
    ("gauss1d", "cd", 2, ODE_ERROR, None): {100: [1, 1], 200: [1, 1]},         # re-noised: no ideal
}


def record(dataset, variant, seed, nfe, metric, value, ideal, step) -> dict:
    """A metric record as evaluation writes it, with the training-budget fields."""
    per_step = FLOPS_PER_STEP[variant]
    return {"suite": "budget", "dataset": dataset, "variant": variant, "seed": seed, "nfe": nfe,
            "sigmas": [80.0] * nfe, "sampler": "consistency", "n_gen": 1000, "backend": "cmbench-toy",
            "backend_version": "0.0", "mode": "exact ground truth", "metric": metric, "value": value, "ideal": ideal,
            "step": step, "images": step * BATCH, "train_seconds": step / 50,
            "train_flops": None if per_step is None else step * per_step}


def records(tmp_path, values=VALUES) -> pd.DataFrame:
    """The records of `values`, one records.json per run, loaded as the report loads them."""
    runs = {}
    for (dataset, variant, nfe, metric, ideal), steps in values.items():
        for step, seeds in steps.items():
            for seed, v in enumerate(seeds):
                runs.setdefault((dataset, variant, seed), []).append(
                    record(dataset, variant, seed, nfe, metric, float(v), ideal, step))
    files = []
    for (dataset, variant, seed), rs in runs.items():
        f = tmp_path / f"{dataset}-{variant}-s{seed}.json"
        f.write_text(json.dumps(rs))
        files.append(f)
    return load_records(files)


@pytest.fixture
def df(tmp_path):
    return records(tmp_path)


def final_only(values=VALUES) -> dict:
    """Each run's last step only: no intermediate evaluation."""
    return {k: {max(steps): steps[max(steps)]} for k, steps in values.items()}


# ------------------------------------------------------------------------------------------------ matched budget
def test_matched_budget_holds_every_variant_at_the_common_image_counts(df):
    c = budget.checkpoints(df)
    assert budget.common_images(c) == {"ring2d": [20_000, 30_000], "gauss1d": [10_000, 20_000]}
    m = budget.matched_budget(c).set_index(["dataset", "key", "nfe", "variant", "images"])
    # every (variant, NFE, metric) of ring2d at both common counts, and nothing else
    assert len(m.loc["ring2d"]) == 2 * 7 and len(m.loc["gauss1d"]) == 2 * 5
    for (dataset, variant, nfe, metric, _), steps in VALUES.items():
        for step in (200, 300) if dataset == "ring2d" else (100, 200):
            row = m.loc[(dataset, metric, nfe, variant, step * BATCH)]
            seeds = pd.Series(steps[step], dtype=float)
            assert (row["mean"], row["min"], row["max"], row["seeds"]) == (seeds.mean(), seeds.min(), seeds.max(), 2)
            assert row["sd"] == pytest.approx(seeds.std())
    assert m.loc[("ring2d", SLICED_W2, 1, "cd", 30_000), "train_flops"] == 300 * 3e9
    assert pd.isna(m.loc[("ring2d", SLICED_W2, 35, "edm", 30_000), "train_flops"])


def test_matched_budget_tables_show_the_cells_and_the_seed_count(df, tmp_path):
    paths = budget.write_budget_tables(df, "budget", tmp_path)
    assert paths == [p for p in report_outputs("budget", tmp_path, tmp_path / "plots")
                     if p.parent == tmp_path and p.name.startswith(("budget_", "images_to_reach_"))]
    csv = pd.read_csv(paths[0])
    assert set(csv["images"]) == {10_000, 20_000, 30_000} and len(csv) == 2 * 7 + 2 * 5
    md = paths[1].read_text()
    # cd at 20,000 images: seeds 2 and 3 → 2.5 ± 0.71; edm has one column per common count, not 10,000
    assert "| variant | metric | NFE | seeds | 20,000 images | 30,000 images |" in md
    assert "| cd | sliced_w2 | 1 | 2 | 2.5 ± 0.71 | 1 ± 0 |" in md
    assert "Training-image counts at which every variant (cd, edm, ict) has a record: 20,000, 30,000." in md
    assert r"\begin{tabular}" in paths[2].read_text()


# ---------------------------------------------------------------------------------------------- images to reach
def test_images_to_reach_is_the_first_checkpoint_that_meets_the_threshold(df):
    r = budget.images_to_reach(budget.checkpoints(df)).set_index(["dataset", "metric", "nfe", "variant"])
    # ring2d sliced_w2: edm final mean 0.25 → threshold 0.5; ict meets it exactly at 30,000 (then stays below)
    row = r.loc[("ring2d", SLICED_W2, 1, "ict")]
    assert (row["threshold"], row["rule"], row["reach"]) == (0.5, "edm final (NFE 35) × 2", "≤")
    assert (row["images"], row["train_flops"], row["seeds"], row["checkpoints"]) == (30_000, 300 * 2e9, 2, 4)
    assert r.loc[("ring2d", SLICED_W2, 2, "ict"), "images"] == 30_000       # NFE 2: 0.75 at 20,000, then 0.25
    assert r.loc[("ring2d", SLICED_W2, 1, "cd"), ["images", "train_flops"]].tolist() == [budget.NOT_REACHED] * 2
    assert r.loc[("ring2d", SLICED_W2, 35, "edm"), ["images", "train_flops"]].tolist() == [30_000, budget.NA]
    # near_mode_fraction is higher-is-better: edm final 0.75 → at or above 0.375; cd's mean is 0.375 at 20,000
    row = r.loc[("ring2d", NEAR_MODE, 1, "cd")]
    assert (row["threshold"], row["rule"], row["reach"], row["images"]) == (0.375, "edm final (NFE 35) ÷ 2", "≥",
                                                                            20_000)
    assert r.loc[("ring2d", NEAR_MODE, 1, "ict"), "images"] == budget.NOT_REACHED
    # gauss1d has no teacher: the ideal × 2 (0.25); an ideal of 0, or none, sets no threshold
    row = r.loc[("gauss1d", W2, 1, "cd")]
    assert (row["threshold"], row["rule"], row["images"]) == (0.25, "ideal × 2", 20_000)
    assert r.loc[("gauss1d", W2, 1, "ict"), "images"] == budget.NOT_REACHED
    for nfe in (1, 2):
        assert r.loc[("gauss1d", ODE_ERROR, nfe, "cd"), ["threshold", "rule", "images"]].tolist() == [budget.NA] * 3


def test_images_to_reach_table_states_its_rule(df, tmp_path):
    md = budget.write_budget_tables(df, "budget", tmp_path)[4].read_text()
    assert "final value (mean over seeds, at its highest NFE) × 2 for a lower-is-better metric, ÷ 2" in md
    assert "| ict | sliced_w2 | 1 | ≤ | 0.5 | edm final (NFE 35) × 2 | 30,000 | 6e+11 | 2 | 4 |" in md


# ------------------------------------------------------------------------------------------------------ plots
def _panel(fig, title):
    return next(ax for ax in fig.axes if ax.get_title() == title)


def test_curves_have_one_line_and_band_per_variant_at_the_seed_mean(df):
    d = budget.headline(budget.budget_records(df))
    assert sorted(set(d["label"])) == ["cd (NFE 1)", "edm (NFE 35)", "ict (NFE 1)"]     # ict's NFE 2 left out
    fig = budget.draw_curves(d, "images")
    ax = _panel(fig, f"ring2d · {SLICED_W2}")
    lines, bands = ax.get_lines(), ax.collections
    assert len(lines) == len(bands) == 3
    means = {tuple(line.get_xdata()): list(line.get_ydata()) for line in lines}
    assert means[(20_000, 30_000, 40_000, 50_000)] == [1.5, 0.5, 0.25, 0.125]      # ict, mean of the two seeds
    assert means[(10_000, 20_000, 30_000)] == [2, 1, 0.25]                          # edm
    edm_band, = [b for b in bands if b.get_paths()[0].vertices[:, 0].max() == 30_000]
    assert {(30_000, 0.125), (30_000, 0.375)} <= set(map(tuple, edm_band.get_paths()[0].vertices))  # min–max
    assert ax.get_xscale() == "linear" and ax.get_yscale() == "log"    # 1e4–5e4 images; values 0.125–4
    assert {a.get_title() for a in fig.axes if a.get_title()} == {
        f"ring2d · {SLICED_W2}", f"ring2d · {NEAR_MODE}", f"gauss1d · {W2}", f"gauss1d · {ODE_ERROR}"}


def test_flops_curves_leave_out_runs_without_a_flop_estimate(df, tmp_path):
    d = budget.headline(budget.budget_records(df)).dropna(subset=["train_flops"])
    ax = _panel(budget.draw_curves(d, "train_flops"), f"ring2d · {SLICED_W2}")
    assert sorted(tuple(line.get_xdata()) for line in ax.get_lines()) == [
        tuple(s * 3e9 for s in (100, 200, 300, 400)), tuple(s * 2e9 for s in (200, 300, 400, 500))]
    budget.plot_budget(df, tmp_path / "flops.png", "train_flops")
    assert (tmp_path / "flops.png").stat().st_size > 20_000


# ------------------------------------------------------------------------------------------------- empty cases
def test_runs_evaluated_only_at_the_end_still_give_every_output(tmp_path):
    df = records(tmp_path, final_only())
    paths = budget.write_budget_tables(df, "once", tmp_path)
    md = paths[1].read_text()
    assert "No training-image count at which every variant (cd, edm, ict) has a record" in md
    assert "evaluated at one step only" in md
    assert "Training-image counts at which every variant (cd, ict) has a record: 20,000." in md    # gauss1d
    assert set(pd.read_csv(paths[0])["dataset"]) == {"gauss1d"}
    r = pd.read_csv(paths[3]).set_index(["dataset", "metric", "nfe", "variant"])
    assert r.loc[("ring2d", SLICED_W2, 1, "ict"), "images"] == "50000"         # its final checkpoint reaches it
    assert r.loc[("ring2d", SLICED_W2, 1, "cd"), "images"] == budget.NOT_REACHED
    ax = _panel(budget.draw_curves(budget.headline(budget.budget_records(df)), "images"), f"ring2d · {SLICED_W2}")
    assert sorted(len(line.get_xdata()) for line in ax.get_lines()) == [1, 1, 1]     # one point per variant
    budget.plot_budget(df, tmp_path / "images.png", "images")
    assert (tmp_path / "images.png").stat().st_size > 20_000


def test_records_without_budget_fields_give_outputs_that_say_so(tmp_path):
    old = load_records(FIXTURES)                               # the golden fixtures predate the budget fields
    paths = budget.write_budget_tables(old, "golden", tmp_path)
    assert all(budget.NO_BUDGET in p.read_text() for p in paths[1:3] + paths[4:])
    assert all(pd.read_csv(p).empty for p in (paths[0], paths[3]))
    for x in ("images", "train_flops"):
        budget.plot_budget(old, tmp_path / f"{x}.png", x)
        assert 1000 < (tmp_path / f"{x}.png").stat().st_size < 20_000          # the placeholder
    no_flops = records(tmp_path, final_only()).assign(train_flops=None)
    budget.plot_budget(no_flops, tmp_path / "none.png", "train_flops")
    assert (tmp_path / "none.png").stat().st_size < 20_000
