"""Design power: closed forms against a hand-computed case and against simulated OLS fits."""

from __future__ import annotations

import numpy as np
import pytest

from hmoe_sim.power import design_table, difference_halfwidth, slope_halfwidth, slope_power, slope_standard_error
from hmoe_sim.rates import fit_rate


def test_standard_error_by_hand():
    # two sizes e and e^3: x = 1, 3, sum (x - 2)^2 = 2; R = 2, sd = 2 -> 2 / sqrt(2 * 2) = 1
    assert slope_standard_error([np.e, np.e**3], 2, 2.0) == pytest.approx(1.0)
    assert slope_standard_error([np.e, np.e**3], 2, 2.0, truths=4) == pytest.approx(0.5)


def test_halfwidth_matches_simulated_fit_rate_intervals():
    sizes = np.geomspace(1000, 10_000, 5)
    reps, sd = 6, 1.36
    rng = np.random.default_rng(0)
    n = np.repeat(sizes, reps)
    slopes, widths = [], []
    for _ in range(300):
        loss = np.exp(-0.5 * np.log(n) + sd * rng.standard_normal(n.size))
        fit = fit_rate(n, loss, n_boot=400, seed=1)
        slopes.append(fit.slope)
        widths.append((fit.ci_high - fit.ci_low) / 2)
    assert np.std(slopes) == pytest.approx(slope_standard_error(sizes, reps, sd), rel=0.12)
    # the bootstrap interval of 6 replications per size is somewhat narrower than the normal one
    assert np.median(widths) == pytest.approx(slope_halfwidth(sizes, reps, sd), rel=0.2)


def test_power_and_difference():
    sizes = np.geomspace(1000, 10_000, 5)
    assert slope_power(0.0, sizes, 6, 1.0) == pytest.approx(0.05, abs=1e-12)
    assert slope_power(-0.5, sizes, 200, 1.0) > 0.999
    assert difference_halfwidth(4, 1.0, 1.0) == pytest.approx(1.959964 * np.sqrt(0.5), rel=1e-6)
    table = design_table({"a": (sizes, 6)}, {"shared": 1.36}, truths=8)
    assert table.loc[0, "ensemble_halfwidth"] == pytest.approx(table.loc[0, "slope_halfwidth"] / np.sqrt(8))


@pytest.mark.parametrize(("sizes", "reps", "sd", "match"), [
    ([1000], 6, 1.0, r"\[1000\]"), ([1000, 2000], 0, 1.0, "replications"), ([1000, 2000], 6, -1.0, "sd")])
def test_bad_designs_are_named(sizes, reps, sd, match):
    with pytest.raises(ValueError, match=match):
        slope_standard_error(sizes, reps, sd)
