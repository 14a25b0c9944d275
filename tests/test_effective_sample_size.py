"""Rates on the effective sample size n/sigma^2: the n_eff rows, their upper-range slope and the
equivalence of two sizes at the same n_eff, on constructed per-fit tables whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hmoe_sim.rates import (
    EQUIVALENCE_MARGIN,
    beyond_margin,
    fit_rate,
    matched_pairs,
    merge_axis_values,
    upper_range,
    worst_pair,
)
from hmoe_sim.sweep.config import parse_config
from hmoe_sim.sweep.ensemble import ensemble_slope, ensemble_table, paired_largest_n, per_truth_table
from hmoe_sim.sweep.report import format_rates, rates_table, summary_table

SIZES = (1000, 10000)
#: sigma = 0.05 * 10^(-k/2), k = 0..4: n_eff from 4e5 to 4e10, four values reached by both sizes
SIGMAS = tuple(0.05 * 10 ** (-k / 2) for k in range(5))

CFG = parse_config({
    "truth": {"preset": "sigmoid-regime1"},
    "sample": {"sizes": list(SIZES), "replications": 6},
    "fit": {"random_starts": 1},
    "series": [{"name": "s"}],
    "losses": {"kinds": ["D1"], "l2": False},
})


def ladder(loss, *, sd: float = 0.1, reps: int = 6, seed: int = 0, sigmas=SIGMAS, series: str = "s",
           truth: int = CFG.truth_seeds[0]) -> pd.DataFrame:
    """A noise ladder: per (n, sigma) ``reps`` fits of loss ``loss(n, sigma) * exp(sd * e)``, and the
    noise-free controls (sigma = 0, n_eff = inf) at round-off, once per (n, replication)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in SIZES:
        for sigma in sigmas:
            for r in range(reps):
                rows.append({"truth": truth, "series": series, "control": "", "n": n, "noise_std": sigma,
                             "n_eff": n / sigma**2, "replication": r,
                             "D1": loss(n, sigma) * np.exp(sd * rng.standard_normal()),
                             "diverged": False, "on_boundary": False, "converged": True})
        for r in range(reps):
            rows.append({"truth": truth, "series": series, "control": "noise_free", "n": n, "noise_std": 0.0,
                         "n_eff": np.inf, "replication": r, "D1": 1e-15, "diverged": False, "on_boundary": False,
                         "converged": True})
    return pd.DataFrame(rows)


def _rows(results: pd.DataFrame, config=CFG, n_boot: int = 400) -> pd.DataFrame:
    return rates_table(results, config, n_boot=n_boot, floors={}, flats={}).set_index("axis")


def test_axis_values_that_agree_to_rounding_are_one_value():
    # 1e3 / 0.005^2 and 1e4 / (0.05 / sqrt(10))^2 are 4e7 up to rounding
    a, b = 1e3 / (0.05 * 10 ** -0.5 * 10 ** -0.5) ** 2, 1e4 / (0.05 * 10 ** -0.5) ** 2
    merged = merge_axis_values([b, a, 4e6, 4e6 * (1 + 1e-6)])
    assert merged[0] == merged[1] == min(a, b)
    assert merged[2] == 4e6 and merged[3] != merged[2]  # 1e-6 apart: two values
    with pytest.raises(ValueError, match="entry 1 is -1.0"):
        merge_axis_values([1.0, -1.0])
    with pytest.raises(ValueError, match="entry 0 is inf"):
        merge_axis_values([np.inf, 4e6])


def test_upper_range_is_the_upper_half_of_the_distinct_values():
    assert upper_range([1000, 3107, 9655]).tolist() == [3107, 9655]
    assert upper_range([100, 1000, 10000, 100000]).tolist() == [10000, 100000]
    n_eff = [n / s**2 for n in SIZES for s in SIGMAS]  # 6 distinct values, 4e5 .. 4e10
    np.testing.assert_allclose(upper_range(n_eff), [4e8, 4e9, 4e10], rtol=1e-9)


def test_fit_rate_bootstraps_within_the_given_cells():
    # two cells at each axis value, each cell constant: resampling within cells never moves the slope,
    # resampling within the axis value (the default) mixes the cells and does
    x = np.repeat([1e3, 1e4], 8)
    loss = np.tile(np.repeat([1.0, 2.0], 4), 2) * x**-0.5
    cells = np.repeat(np.arange(4), 4)
    within_cells = fit_rate(x, loss, n_boot=300, cells=cells)
    pooled = fit_rate(x, loss, n_boot=300)
    assert within_cells.slope == pytest.approx(-0.5) == pooled.slope
    assert within_cells.ci_high - within_cells.ci_low == pytest.approx(0.0, abs=1e-12)
    assert pooled.ci_high - pooled.ci_low > 0.05
    # the default cells are the sizes: the same bootstrap draw for draw
    rng = np.random.default_rng(1)
    n = np.repeat([100, 1000, 10000], 5)
    y = n**-0.5 * np.exp(rng.normal(0, 0.3, n.size))
    assert fit_rate(n, y, n_boot=200, cells=n) == fit_rate(n, y, n_boot=200)
    with pytest.raises(ValueError, match="cells"):
        fit_rate(n, y, cells=np.zeros(3))


def test_matched_pairs_by_hand():
    # n_eff 1e7 reached by n = 1e3 and 1e4; medians of log loss 0 and log 3 (odd counts: exact medians)
    n = [1000] * 3 + [10000] * 3 + [1000]
    n_eff = [1e7] * 6 + [1e8]
    loss = [0.5, 1.0, 4.0, 3.0, 2.0, 30.0, 1.0]
    pairs = matched_pairs(n, n_eff, loss, n_boot=500)
    assert len(pairs) == 1
    p = pairs[0]
    assert (p.n_eff, p.n_small, p.n_large, p.count_small, p.count_large) == (1e7, 1000, 10000, 3, 3)
    assert p.diff == pytest.approx(np.log(3.0))
    # every bootstrap median is one of the cell's values: the CI lies within the extreme differences
    assert np.log(2.0 / 4.0) - 1e-12 <= p.ci_low <= p.diff <= p.ci_high <= np.log(30.0 / 0.5) + 1e-12
    assert worst_pair(pairs) is p and worst_pair([]) is None
    assert beyond_margin(0.8, 1.2) and beyond_margin(-1.2, -0.8)
    assert not beyond_margin(0.5, 1.2) and not beyond_margin(np.nan, 2.0)
    assert EQUIVALENCE_MARGIN == pytest.approx(np.log(2))


def test_loss_of_n_eff_alone_gives_the_slope_and_passes_equivalence():
    rates = _rows(ladder(lambda n, s: 3.0 * (n / s**2) ** -0.5))
    assert set(rates.index) == {"n", "n_eff"}
    row = rates.loc["n_eff"]
    assert row.slope == pytest.approx(-0.5, abs=0.02) and row.ci_low < -0.5 < row.ci_high
    assert row.slope_upper == pytest.approx(-0.5, abs=0.05)
    assert (row.n_sizes, row.n_min, row.n_max) == (6, pytest.approx(4e5), pytest.approx(4e10))
    # 4 n_eff values are reached by both sizes, 2 of them (4e8, 4e9) in the upper range
    assert (row.n_matched, row.n_matched_upper) == (4, 2)
    assert abs(row.equivalence_diff) < 0.2 and row.equivalence_ci_low < 0 < row.equivalence_ci_high
    assert row.equivalence.count("n_eff") == 4 and "!" not in row.equivalence
    assert row.verdict == "rate", row.evidence
    assert "values of n_eff" in row.evidence and "matched sizes agree" in row.evidence
    # the n row is the fixed-noise sweep at the largest sigma: 2 sizes, one decade
    n_row = rates.loc["n"]
    assert n_row.noise_std == SIGMAS[0] and n_row.n_sizes == 2 and n_row.verdict == "short-range"
    assert (n_row.n_matched, n_row.equivalence_diff) == (0, pytest.approx(np.nan, nan_ok=True))
    text = format_rates(rates.reset_index())
    assert "axis" in text and "n_eff" in text and "equivalence_diff" in text


def test_loss_of_sigma_alone_fails_equivalence():
    # loss = C sigma: at the same n_eff the larger size has sqrt(10) times the sigma, +1.15 in log loss
    rates = _rows(ladder(lambda n, s: 3.0 * s))
    row = rates.loc["n_eff"]
    assert row.equivalence_diff == pytest.approx(0.5 * np.log(10), abs=0.15)
    assert row.equivalence_ci_low > EQUIVALENCE_MARGIN
    assert row.equivalence.count("!") == 4
    assert row.verdict == "not-equivalent", row.evidence
    assert "+1.1" in row.evidence


def test_a_difference_inside_the_margin_is_not_evidence_against_equivalence():
    # a design effect of a factor 1.5 between the two sizes (log 1.5 < log 2): still a rate
    rates = _rows(ladder(lambda n, s: 3.0 * (n / s**2) ** -0.5 * (1.5 if n == 10000 else 1.0), sd=0.1))
    row = rates.loc["n_eff"]
    assert row.equivalence_diff == pytest.approx(np.log(1.5), abs=0.15)
    assert row.equivalence_ci_low > 0  # the difference is resolved ...
    assert row.verdict == "rate", row.evidence  # ... but within the margin


def test_slope_upper_of_a_broken_power_law_is_the_upper_segments():
    # slope -1 up to n_eff = 1e8, -0.25 above (continuous): the upper range is 4e8, 4e9, 4e10
    def broken(n, s):
        x = n / s**2
        return np.where(x <= 1e8, (x / 1e8) ** -1.0, (x / 1e8) ** -0.25)

    row = _rows(ladder(broken, sd=0.0)).loc["n_eff"]
    assert row.slope_upper == pytest.approx(-0.25, abs=1e-9)
    assert row.ci_low_upper == pytest.approx(-0.25, abs=1e-9) and row.ci_high_upper == pytest.approx(-0.25, abs=1e-9)
    assert row.slope < -0.5  # the whole range bends
    assert row.verdict == "pre-asymptotic", row.evidence


def test_n_rows_of_single_sigma_data_are_unchanged():
    one = ladder(lambda n, s: 3.0 * n**-0.5, sigmas=(0.05,))
    bare = one.drop(columns=["noise_std", "n_eff"])
    with_noise, without = _rows(one), _rows(bare)
    assert list(with_noise.index) == list(without.index) == ["n"]
    pd.testing.assert_frame_equal(with_noise.drop(columns="noise_std"), without.drop(columns="noise_std"))
    assert with_noise.loc["n", "noise_std"] == 0.05 and np.isnan(without.loc["n", "noise_std"])
    # the n rows of a ladder are those of its largest sigma alone
    full = ladder(lambda n, s: 3.0 * (n / s**2) ** -0.5)
    largest = full[(full["noise_std"] == SIGMAS[0]) | (full["control"] != "")]
    pd.testing.assert_series_equal(_rows(full).loc["n"], _rows(largest).loc["n"])


def test_summary_has_one_row_per_noise_level_on_a_ladder():
    results = ladder(lambda n, s: 3.0 * (n / s**2) ** -0.5, sd=0.0)
    summary = summary_table(results, CFG)
    noisy = summary[summary["control"] == ""]
    assert len(noisy) == len(SIZES) * len(SIGMAS)
    np.testing.assert_allclose(noisy["n_eff"], noisy["n"] / noisy["noise_std"] ** 2)
    np.testing.assert_allclose(noisy["D1_median"], 3.0 * noisy["n_eff"] ** -0.5, rtol=1e-12)
    control = summary[summary["control"] == "noise_free"]
    assert len(control) == len(SIZES) and (control["noise_std"] == 0).all() and np.isinf(control["n_eff"]).all()
    # without a ladder the table has no noise columns
    single = summary_table(ladder(lambda n, s: 1.0, sigmas=(0.05,)), CFG)
    assert "n_eff" not in single and len(single) == 2 * len(SIZES)


PAIR_CFG = parse_config({
    "truth": {"preset": "hmoe-shared", "seeds": [1, 2]},
    "sample": {"sizes": list(SIZES), "replications": 6},
    "fit": {"random_starts": 1},
    "series": [{"name": "shared", "structure": "shared"}, {"name": "nonshared", "structure": "nonshared"}],
    "losses": {"kinds": ["D1"], "l2": False},
})


def test_ensemble_tables_have_an_n_eff_view():
    results = pd.concat([
        ladder(lambda n, s: 2.0 * (n / s**2) ** -0.5, series="shared", truth=t, seed=t) for t in (1, 2)] + [
        ladder(lambda n, s: 2.0 * (n / s**2) ** -0.25, series="nonshared", truth=t, seed=10 + t) for t in (1, 2)],
        ignore_index=True)
    rates = rates_table(results, PAIR_CFG, n_boot=200, floors={}, flats={})
    per_truth = per_truth_table(rates, PAIR_CFG, results)
    assert set(per_truth["axis"]) == {"n", "n_eff"} and len(per_truth) == 2 * 2 * 2
    ensemble = ensemble_table(per_truth, PAIR_CFG, results, n_boot=200).set_index("axis")
    e = ensemble.loc["n_eff"]
    assert e.shared_ensemble_slope_upper == pytest.approx(-0.5, abs=0.05)
    assert e.nonshared_ensemble_slope_upper == pytest.approx(-0.25, abs=0.05)
    assert e.largest_n == pytest.approx(4e10)
    # paired at the largest n_eff (n = 1e4, smallest sigma): shared - non-shared = -0.25 log(4e10), noise aside
    assert e.largest_n_diff_median == pytest.approx(-0.25 * np.log(4e10), abs=0.3)
    assert ensemble.loc["n", "largest_n"] == 10000
    assert (e.n_truths, e.n_shared_upper_ci_below) == (2, 2)
    # the pooled n_eff slope: one slope over both truths, resampled within (truth, n, sigma)
    fit = ensemble_slope(results, "shared", "D1", axis="n_eff", n_boot=200)
    assert fit["slope"] == pytest.approx(-0.5, abs=0.02) and fit["n_fits"] == 2 * len(SIZES) * len(SIGMAS) * 6
    per, _ = paired_largest_n(results, "shared", "nonshared", "D1", axis="n_eff", n_boot=100)
    assert (per["n_pairs"] == 6).all()


def _pair_ladder() -> pd.DataFrame:
    return pd.concat([
        ladder(lambda n, s: 2.0 * (n / s**2) ** -0.5, series="shared", truth=t, seed=t, sd=0.3) for t in (1, 2)] + [
        ladder(lambda n, s: 2.0 * (n / s**2) ** -0.25, series="nonshared", truth=t, seed=10 + t, sd=0.3)
        for t in (1, 2)], ignore_index=True)


def test_neff_figures_draw_every_size_the_control_and_the_labels(tmp_path):
    from hmoe_sim.plotting import plot_neff_panels, plot_rate_panels

    results = _pair_ladder()
    rates = rates_table(results, PAIR_CFG, n_boot=100, floors={}, flats={})
    summary = summary_table(results, PAIR_CFG)
    structures = {"shared": "shared", "nonshared": "nonshared"}
    one = plot_neff_panels(summary[summary["truth"] == 1], rates[rates["truth"] == 1], ["D1"], structures=structures)
    ax = one.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert any(t.startswith("HoRA (shared): slope -0.5") for t in labels)
    assert any(t.startswith("MH-LoRA (non-shared): slope -0.2") for t in labels)
    assert {"n = 1000", "n = 10000", "reference (n/σ²)^-1/2"} <= set(labels)
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "σ = 0"
    # the legend sits outside the data: below the axes
    assert ax.get_legend().get_bbox_to_anchor().y0 < ax.get_window_extent().y0
    # every (series, n, sigma) median is drawn: 2 series x 2 sizes, 5 noise levels each
    drawn = [line for line in ax.lines if len(line.get_xdata()) == len(SIGMAS)]
    assert len(drawn) == 4
    path = tmp_path / "neff.png"
    one.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    both = plot_neff_panels(summary, rates, ["D1"], structures=structures)
    assert [a.get_title() for a in both.axes] == ["D1, truth 1", "D1, truth 2"]
    with pytest.raises(ValueError, match="n_eff"):
        plot_neff_panels(summary.drop(columns="n_eff"), rates, ["D1"])
    # the n-axis figure keeps working and takes the same labels
    n_summary = summary_table(ladder(lambda n, s: n**-0.5, sigmas=(0.05,)), CFG)
    n_rates = rates_table(ladder(lambda n, s: n**-0.5, sigmas=(0.05,)), CFG, n_boot=50, floors={}, flats={})
    fig = plot_rate_panels(n_summary, n_rates, ["D1"], structures={"s": "shared"})
    assert any(t.startswith("HoRA (shared)") for t in fig.axes[0].get_legend_handles_labels()[1])
    fig.savefig(tmp_path / "n.png")
    assert (tmp_path / "n.png").stat().st_size > 0


def test_forest_of_upper_half_slopes_on_n_eff(tmp_path):
    from hmoe_sim.plotting import plot_forest

    results = _pair_ladder()
    rates = rates_table(results, PAIR_CFG, n_boot=100, floors={}, flats={})
    per_truth = per_truth_table(rates, PAIR_CFG, results)
    ensemble = ensemble_table(per_truth, PAIR_CFG, results, n_boot=100)
    fig = plot_forest(per_truth, ["D1"], ensemble=ensemble, upper=True)
    ax = fig.axes[0]
    xs = {round(float(line.get_xdata()[0]), 12) for line in ax.lines if len(line.get_xdata()) == 1}
    upper = per_truth[(per_truth["axis"] == "n_eff") & (per_truth["loss"] == "D1")]["slope_upper"]
    pooled = ensemble[ensemble["axis"] == "n_eff"][["shared_ensemble_slope_upper", "nonshared_ensemble_slope_upper"]]
    assert {round(float(v), 12) for v in upper} | {round(float(v), 12) for v in pooled.to_numpy().ravel()} <= xs
    assert "n/σ², upper half" in ax.get_xlabel()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["truth 1", "truth 2", "all truths (ensemble slope)"]
    assert {"HoRA (shared)", "MH-LoRA (non-shared)"} <= set(fig.legends[0].get_texts()[i].get_text() for i in range(2))
    with pytest.raises(ValueError, match="'n_eff' is not in the table"):
        plot_forest(per_truth[per_truth["axis"] == "n"], ["D1"], axis="n_eff")
    fig.savefig(tmp_path / "forest.png")
    assert (tmp_path / "forest.png").stat().st_size > 0


def test_the_sweep_figure_of_a_noise_ladder_is_drawn_on_n_eff(tmp_path):
    from hmoe_sim.cli import main

    config = tmp_path / "ladder.toml"
    config.write_text('''name = "ladder"
root_seed = 1
[truth]
preset = "hmoe-shared"
seeds = [1, 2]
options = { expert_std = 1.0, gate_slope_std = 1.0 }
[sample]
sizes = [60, 120]
noise_levels = [0.1, 0.01]
replications = 2
chunk = 2
controls = ["noise_free"]
[fit]
method = "lm"
max_iter = 3
random_starts = 1
[[series]]
name = "shared"
structure = "shared"
[[series]]
name = "nonshared"
structure = "nonshared"
[losses]
kinds = ["D1"]
l2_n_eval = 200
''')
    out = tmp_path / "run"
    assert main(["sweep", str(config), "--out", str(out), "--no-progress"]) == 0
    rates = pd.read_csv(out / "rates.csv")
    assert set(rates["axis"]) == {"n", "n_eff"}
    # n = 60 at sigma = 0.01 and n = 120 at sigma = 0.01 / sqrt(2) would match; these two sizes match nowhere
    assert (rates["n_matched"] == 0).all()
    assert set(pd.read_csv(out / "per_truth.csv")["axis"]) == {"n", "n_eff"}
    for name in ("ladder.png", "ladder_losses.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
