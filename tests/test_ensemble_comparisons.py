"""Paired comparisons of a truth ensemble from the per-fit results (issue 22)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hmoe_sim.sweep.ensemble import ensemble_slope, paired_largest_n


def _results(slopes: dict[str, float], truths=(1, 2, 3), sizes=(1000, 3162, 10000), reps=4, sd=0.0, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for t in truths:
        for series, slope in slopes.items():
            for n in sizes:
                for r in range(reps):
                    value = np.exp(t + slope * np.log(n) + sd * rng.standard_normal())
                    rows.append({"truth": t, "series": series, "control": "", "n": n, "replication": r, "D1": value})
                rows.append({"truth": t, "series": series, "control": "noise_free", "n": n, "replication": 0,
                             "D1": 1e-15})
    return pd.DataFrame(rows)


def test_paired_largest_n_by_hand():
    frame = pd.DataFrame({
        "truth": [1, 1, 1, 1, 1, 1], "series": ["s", "s", "s", "ns", "ns", "ns"], "control": [""] * 6,
        "n": [100, 1000, 1000, 100, 1000, 1000], "replication": [0, 0, 1, 0, 0, 1],
        "D1": [1.0, np.e**-1, np.e**-2, 1.0, np.e**0, np.e**1]})
    per_truth, summary = paired_largest_n(frame, "s", "ns", "D1", n_boot=200)
    # at n = 1000: differences -1 - 0 = -1 and -2 - 1 = -3, mean -2
    assert per_truth.loc[0, "diff"] == pytest.approx(-2.0)
    assert per_truth.loc[0, "n_pairs"] == 2
    assert -3.0 <= per_truth.loc[0, "diff_ci_low"] <= per_truth.loc[0, "diff_ci_high"] <= -1.0
    assert summary["n_shared_below"] == 1 and summary["median"] == pytest.approx(-2.0)


def test_paired_largest_n_pairs_only_data_sets_fitted_by_both():
    frame = _results({"s": -0.5, "ns": -0.25})
    frame = frame[~((frame["series"] == "ns") & (frame["replication"] == 3))]
    per_truth, _ = paired_largest_n(frame, "s", "ns", "D1", n_boot=100)
    assert (per_truth["n_pairs"] == 3).all()
    np.testing.assert_allclose(per_truth["diff"], -0.25 * np.log(10000), rtol=1e-12)


def test_ensemble_slope_is_ols_with_one_intercept_per_truth():
    frame = _results({"s": -0.5}, sd=0.7, seed=3)
    fit = ensemble_slope(frame, "s", "D1", n_boot=300)
    noisy = frame[frame["control"] == ""]
    # independent answer: least squares on [log n, one indicator per truth]
    x = np.log(noisy["n"].to_numpy(float))
    dummies = pd.get_dummies(noisy["truth"]).to_numpy(float)
    coef, *_ = np.linalg.lstsq(np.column_stack([x, dummies]), np.log(noisy["D1"].to_numpy()), rcond=None)
    assert fit["slope"] == pytest.approx(coef[0], rel=1e-10)
    assert fit["ci_low"] < fit["slope"] < fit["ci_high"]
    assert (fit["n_truths"], fit["n_fits"]) == (3, 36)
    exact = ensemble_slope(_results({"s": -0.5}), "s", "D1", n_boot=50)
    assert exact["slope"] == pytest.approx(-0.5) and exact["ci_high"] - exact["ci_low"] == pytest.approx(0, abs=1e-12)


def test_forest_plot_draws_the_ensemble_row():
    from hmoe_sim.plotting import plot_forest

    per_truth = pd.DataFrame({"truth": [1, 1, 2, 2], "H": 2, "series": ["s", "ns", "s", "ns"],
                              "structure": ["shared", "nonshared"] * 2, "loss": "D1", "slope": -0.5,
                              "ci_low": -0.7, "ci_high": -0.3, "verdict": "rate"})
    ensemble = pd.DataFrame({"H": [2], "loss": ["D1"], "shared_ensemble_slope": [-0.5],
                             "shared_ensemble_ci_low": [-0.6], "shared_ensemble_ci_high": [-0.4],
                             "nonshared_ensemble_slope": [-0.2], "nonshared_ensemble_ci_low": [-0.4],
                             "nonshared_ensemble_ci_high": [0.0]})
    fig = plot_forest(per_truth, ["D1"], ensemble=ensemble)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["truth 1", "truth 2", "all truths (ensemble slope)"]
    without = plot_forest(per_truth, ["D1"])
    assert [t.get_text() for t in without.axes[0].get_yticklabels()] == ["truth 1", "truth 2"]
