"""Rates and summaries from per-fit results: flagged fits are counted, never averaged in."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hmoe_sim.sweep.config import parse_config
from hmoe_sim.sweep.report import (
    RATE_COLUMNS,
    boundary_excluded,
    boundary_table,
    flagged,
    format_boundary,
    format_rates,
    rates_table,
    summary_table,
    usable,
    worse_than_truth,
)

CFG = parse_config({
    "truth": {"preset": "sigmoid-regime1"},
    "sample": {"sizes": [100, 1000, 10000], "replications": 4},
    "series": [{"name": "fast"}, {"name": "slow"}],
    "losses": {"kinds": ["D1"], "l2": True},
})


def synthetic() -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for name, slope in (("fast", -0.5), ("slow", -0.1)):
        for n in CFG.sizes:
            for r in range(4):
                noise = np.exp(rng.normal(0, 0.01))
                rows.append({"series": name, "n": n, "replication": r, "D1": 3.0 * n**slope * noise,
                             "L2": 0.5 * n**-0.5 * noise, "diverged": False, "on_boundary": False,
                             "converged": True})
    frame = pd.DataFrame(rows)
    # flagged fits with absurd losses, and an unflagged NaN: none may move the slope
    frame.loc[0, ["D1", "diverged"]] = [1e6, True]
    frame.loc[5, ["D1", "on_boundary"]] = [1e-9, True]
    frame.loc[6, "L2"] = np.nan
    return frame


# a policy that excludes boundary fits (results without labels: every boundary fit)
STRICT = {"b:hi"}


def test_rates_recover_slopes_and_count_flagged():
    rates = rates_table(synthetic(), CFG, n_boot=200, exclude=STRICT)
    assert list(rates.columns[: len(RATE_COLUMNS)]) == RATE_COLUMNS
    assert {"rss_power", "rss_log", "preferred", "n_used", "n_flagged"} <= set(rates.columns)
    fast = rates[(rates.series == "fast") & (rates.loss == "D1")].iloc[0]
    slow = rates[(rates.series == "slow") & (rates.loss == "D1")].iloc[0]
    assert fast.slope == pytest.approx(-0.5, abs=0.01) and fast.ci_low < fast.slope < fast.ci_high < fast.ci_low + 0.05
    assert slow.slope == pytest.approx(-0.1, abs=0.01)
    assert (fast.n_fits, fast.n_used, fast.n_flagged, fast.n_bad_loss) == (12, 10, 2, 0)
    l2 = rates[(rates.series == "fast") & (rates.loss == "L2")].iloc[0]
    assert (l2.n_used, l2.n_bad_loss) == (9, 1)
    assert (fast.n_min, fast.n_max) == (100, 10000)
    text = format_rates(rates)
    assert "fast" in text and "-0.5" in text


def test_summary_means_skip_flagged_and_nan():
    frame = synthetic()
    summary = summary_table(frame, CFG, exclude=STRICT)
    first = summary[(summary.series == "fast") & (summary.n == 100)].iloc[0]
    kept = frame.loc[[1, 2, 3], "D1"].to_numpy()
    assert first.n_flagged == 1 and first.D1_n == 3 and first.n_diverged == 1
    assert first.D1_mean == pytest.approx(kept.mean()) and first.D1_sd == pytest.approx(kept.std(ddof=1))
    second = summary[(summary.series == "fast") & (summary.n == 1000)].iloc[0]
    assert second.L2_n == 2 and second.n_on_boundary == 1 and np.isfinite(second.L2_mean)


def test_series_with_one_size_gets_nan_slope():
    frame = synthetic()
    frame.loc[(frame.series == "slow") & (frame.n > 100), "diverged"] = True
    rates = rates_table(frame, CFG, n_boot=50)
    slow = rates[(rates.series == "slow") & (rates.loss == "D1")].iloc[0]
    assert np.isnan(slow.slope) and slow.n_flagged == 8


def test_boundary_policy_counts_and_sensitivity():
    frame = synthetic()
    frame["boundary_params"] = ""
    frame["risk"], frame["risk_truth"] = 0.01, 0.011
    # row 5 is on the boundary (from synthetic()): an atom switched off, with an ordinary loss
    frame.loc[5, ["boundary_params", "D1"]] = ["beta0:lo", 3.0 * 1000**-0.5]
    # rows 7 and 8: a gating slope run off, and the shared gauge
    frame.loc[7, ["on_boundary", "boundary_params", "D1"]] = [True, "a:hi,beta1:hi,z:lo", 50.0]
    frame.loc[8, ["on_boundary", "boundary_params"]] = [True, "W1:hi,z:lo"]
    frame.loc[10, "risk"] = 0.02
    assert worse_than_truth(frame)[worse_than_truth(frame)].index.tolist() == [10]
    # default policy: no kind excludes a fit; only the diverged row 0 is flagged
    assert flagged(frame)[flagged(frame)].index.tolist() == [0]
    policy = {"beta1:hi", "a:lo"}
    excl = boundary_excluded(frame, policy)
    assert excl[excl].index.tolist() == [7]
    assert flagged(frame, policy)[flagged(frame, policy)].index.tolist() == [0, 7]
    rates = rates_table(frame, CFG, n_boot=100, exclude=policy)
    fast = rates[(rates.series == "fast") & (rates.loss == "D1")].iloc[0]
    assert (fast.n_used, fast.n_flagged, fast.n_boundary_excluded, fast.n_on_boundary) == (10, 2, 1, 3)
    assert (fast.n_used_all, fast.n_used_inside, fast.n_worse_than_truth, fast.n_diverged) == (12, 8, 1, 1)
    # the all-fits slope includes the absurd losses (1e6 at n=100, 50 at n=1000): much flatter
    assert fast.slope == pytest.approx(-0.5, abs=0.02) and fast.slope_all < -0.5 - 0.3
    assert fast.slope_inside == pytest.approx(-0.5, abs=0.01)
    default = rates_table(frame, CFG, n_boot=100)
    d1 = default[(default.series == "fast") & (default.loss == "D1")].iloc[0]
    assert (d1.n_used, d1.n_flagged, d1.n_boundary_excluded) == (11, 1, 0)
    middle = summary_table(frame, CFG).query("series == 'fast' and n == 1000").iloc[0]
    assert middle.D1_n == 4 and middle.D1_mean > 50 / 4
    table = boundary_table(frame, policy)
    got = {(r.series, r.kind): (r.n_fits, r.excluded) for r in table.itertuples()}
    assert got == {("fast", "a:hi"): (1, False), ("fast", "beta0:lo"): (1, False), ("fast", "beta1:hi"): (1, True),
                   ("fast", "z:lo"): (2, False), ("fast", "W1:hi"): (1, False)}
    assert "beta1:hi* 1" in format_boundary(table) and "z:lo 2" in format_boundary(table)
    assert "slope_inside" in format_rates(rates)
    summary = summary_table(frame, CFG)
    first = summary[(summary.series == "fast") & (summary.n == 100)].iloc[0]
    assert first.n_flagged == 1 and first.D1_median_inside == pytest.approx(np.median(frame.loc[1:3, "D1"]))
    with pytest.raises(ValueError, match="'some'"):
        usable(frame, "D1", fits="some")


def test_old_results_without_labels():
    frame = synthetic()
    assert flagged(frame)[flagged(frame)].index.tolist() == [0]
    assert flagged(frame, {"b:hi"})[flagged(frame, {"b:hi"})].index.tolist() == [0, 5]
    assert boundary_table(frame).empty and "no fit" in format_boundary(boundary_table(frame))


def test_count_at_iteration_cap():
    from hmoe_sim.estimators.result import count_at_iteration_cap

    n_iter = pd.Series([3, 1000, 999, 1000])
    assert count_at_iteration_cap(n_iter, max_iter=1000) == 2
    assert count_at_iteration_cap(n_iter, max_iter=999, method="adam", tol=1e-10) == 3  # other fit options ignored
    assert count_at_iteration_cap(n_iter, max_iter=3, method="sgd-paper") == 0  # epochs, not an iteration cap
    assert count_at_iteration_cap([], max_iter=5) == 0
    with pytest.raises(ValueError, match="max_iter must be >= 1, got 0"):
        count_at_iteration_cap(n_iter, max_iter=0)
    # summary.csv counts them per (series, n)
    frame = synthetic().assign(n_iter=200)
    frame.loc[frame.index[-2:], "n_iter"] = 200
    frame.loc[frame.index[:3], "n_iter"] = 10
    summary = summary_table(frame, CFG).set_index(["series", "n"])["n_at_max_iter"]
    assert summary[("slow", 10000)] == 4 and summary[("fast", 100)] == 1 and summary[("fast", 1000)] == 4

