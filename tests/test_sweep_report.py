"""Rates and summaries from per-fit results: flagged fits are counted, never averaged in."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hmoe_sim.sweep.config import parse_config
from hmoe_sim.sweep.report import RATE_COLUMNS, format_rates, rates_table, summary_table

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


def test_rates_recover_slopes_and_count_flagged():
    rates = rates_table(synthetic(), CFG, n_boot=200)
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
    summary = summary_table(frame, CFG)
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
