"""Two runs of one configuration compared fit by fit (hmoe_sim.sweep.compare), on hand-built tables."""

from __future__ import annotations

import pandas as pd
import pytest

from hmoe_sim.sweep.compare import compare_fits, matched_fits


def _run(risks: list[float], n: int = 1000, series: str = "s", converged: bool = True) -> pd.DataFrame:
    return pd.DataFrame({"truth": 1, "series": series, "control": "", "n": n, "replication": range(len(risks)),
                         "risk": risks, "n_iter": 10, "converged": converged})


def test_moves_are_counted_in_units_of_the_margin_by_direction():
    old = _run([1.0, 1.0, 1.0, 1.0, 1.0])
    # margin (2 * 0.5 / 1000) * 1.0 = 1e-3: moves of +0.5%, +2%, -2%, +150%, -300% of it
    new = _run([1.0 + 5e-6, 1.0 + 2e-5, 1.0 - 2e-5, 1.0 + 1.5e-3, 1.0 - 3e-3], converged=False)
    both = matched_fits(old, new)
    assert both["moved"].round(6).tolist() == [0.005, 0.02, -0.02, 1.5, -3.0]
    row = compare_fits(old, new, fraction=0.01).set_index("series").loc["all"]
    assert (row["fits"], row["worse"], row["better"], row["worse_1"], row["better_1"]) == (5, 2, 2, 1, 1)
    assert row["converged_old"] == 1.0 and row["converged_new"] == 0.0
    # another margin: the log-likelihood margin 1 doubles it
    assert matched_fits(old, new, loglik_margin=1.0)["moved"].round(6).tolist() == [0.0025, 0.01, -0.01, 0.75, -1.5]


def test_fits_are_matched_by_their_keys_not_their_order():
    old = pd.concat([_run([1.0, 2.0], series="a"), _run([3.0], series="b")])
    new = old.iloc[::-1].reset_index(drop=True)
    table = compare_fits(old, new)
    assert table["worse"].sum() == 0 and table["better"].sum() == 0
    assert table.set_index("series").loc["all", "fits"] == 3
    assert sorted(table["series"]) == ["a", "all", "b"]


def test_runs_that_do_not_match_are_refused():
    with pytest.raises(ValueError, match="no fit in common"):
        compare_fits(_run([1.0], series="a"), _run([1.0], series="b"))
    with pytest.raises(ValueError, match="twice"):
        compare_fits(pd.concat([_run([1.0]), _run([1.0])]), _run([1.0]))
    with pytest.raises(ValueError, match="risk"):
        compare_fits(_run([1.0]).drop(columns="risk"), _run([1.0]))
    with pytest.raises(ValueError, match="fraction"):
        compare_fits(_run([1.0]), _run([1.0]), fraction=0.0)
