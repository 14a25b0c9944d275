"""Tests of hmoe_sim.rates: OLS against numpy, bootstrap coverage, power vs log model choice."""

from __future__ import annotations

import numpy as np
import pytest

from hmoe_sim.rates import (
    RATE_OVERSPECIFIED,
    RATE_PARAMETRIC,
    fit_rate,
    parametric_log_rate,
    reference_curve,
)

SIZES = np.logspace(2, 5, 7).round()


def _design(reps: int) -> np.ndarray:
    return np.repeat(SIZES, reps)


def test_constants_and_reference_curves() -> None:
    assert RATE_PARAMETRIC == -0.5 and RATE_OVERSPECIFIED == -0.25
    assert parametric_log_rate(np.e**2) == pytest.approx(np.sqrt(2 / np.e**2))
    curve = reference_curve([100.0, 10_000.0], "n^-1/2", through=(100.0, 0.3))
    np.testing.assert_allclose(curve, [0.3, 0.03])
    np.testing.assert_allclose(reference_curve([10.0, 100.0], "1/log n", through=(10.0, 1.0)), [1.0, 0.5])
    with pytest.raises(ValueError, match="n must be finite and > 1"):
        parametric_log_rate([1.0])


def test_ols_matches_polyfit_and_exact_power_law() -> None:
    rng = np.random.default_rng(0)
    n = _design(5)
    loss = 2.0 * n**-0.3 * np.exp(rng.normal(0, 0.2, n.size))
    fit = fit_rate(n, loss, n_boot=200)
    slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
    assert fit.slope == pytest.approx(slope, rel=1e-12) and fit.intercept == pytest.approx(intercept, rel=1e-12)
    tau, _ = np.polyfit(np.log(np.log(n)), np.log(loss), 1)
    assert fit.tau == pytest.approx(-tau, rel=1e-12)
    assert fit.n_min == 100 and fit.n_max == 100_000 and fit.n_points == 35 and fit.n_sizes == 7
    assert fit.ci_low < fit.slope < fit.ci_high
    exact = fit_rate(n, 3.0 * n**-0.5, n_boot=50)
    assert exact.slope == pytest.approx(-0.5, abs=1e-12) and exact.rss_power == pytest.approx(0, abs=1e-20)
    assert exact.preferred == "power"
    assert set(fit.as_dict()) >= {"slope", "intercept", "ci_low", "ci_high", "tau", "rss_power", "rss_log",
                                  "preferred", "n_min", "n_max", "n_points", "n_sizes"}
    np.testing.assert_allclose(fit.predict([1.0]), np.exp(fit.intercept))


def test_bootstrap_interval_covers_true_slope() -> None:
    true_slope, hits, reps = -0.37, 0, 200
    n = _design(20)
    for rep in range(reps):
        rng = np.random.default_rng(1000 + rep)
        loss = 0.8 * n**true_slope * np.exp(rng.normal(0, 0.3, n.size))
        fit = fit_rate(n, loss, n_boot=2000, seed=rep)
        hits += fit.ci_low <= true_slope <= fit.ci_high
    assert hits >= 180, f"coverage {hits}/{reps}"
    assert hits <= 199  # an interval that always covers is too wide to be an honest 95% interval


def test_log_model_wins_on_log_data_and_power_on_power_data() -> None:
    rng = np.random.default_rng(4)
    n = np.repeat(np.logspace(1, 6, 8).round(), 10)
    log_data = 0.5 / np.log(n) * np.exp(rng.normal(0, 0.02, n.size))
    fit = fit_rate(n, log_data, n_boot=500)
    assert fit.preferred == "log" and fit.rss_log < fit.rss_power
    assert fit.tau_ci_low <= 1.0 <= fit.tau_ci_high
    power_data = 0.5 * n**-0.5 * np.exp(rng.normal(0, 0.02, n.size))
    assert fit_rate(n, power_data, n_boot=500).preferred == "power"


@pytest.mark.parametrize(
    "n,loss,match",
    [
        ([10, 100, 1000], [0.1, np.nan, 0.01], "entry 1 is nan"),
        ([10, 100, 1000], [0.1, 0.0, 0.01], "entry 1 is 0.0"),
        ([10, 100, 1000], [0.1, -1.0, 0.01], "finite and positive"),
        ([10, 100], [0.1, 0.2, 0.3], "equal length"),
        ([10, 10, 10], [0.1, 0.2, 0.3], "two distinct"),
        ([1, 10, 100], [0.1, 0.2, 0.3], "n must be finite and > 1"),
    ],
)
def test_bad_input_raises(n: list, loss: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fit_rate(n, loss)


def test_bad_level_raises() -> None:
    with pytest.raises(ValueError, match="level"):
        fit_rate([10, 100], [0.1, 0.01], level=1.5)
