"""Two runs of one configuration compared fit by fit: how far the kept fits' risks moved.

Two runs of the same configuration see the same data sets and the same starts (every seed comes from
the root seed and the cell's coordinates), so their rows match on ``truth, series, control, n,
replication``. A kept fit's empirical risk (column ``risk``: the start of least risk) that moved by
less than a small fraction of the near-optimal margin ``(2 * loglik_margin / n) * risk`` is the same
estimate to the data (:func:`hmoe_sim.sweep.cell.near_optimal`); what moved beyond it is counted per
series and control, by direction. Noise-free controls are counted on their own rows: their risks are at
round-off (``1e-20`` and below), where the margin, proportional to the risk, is round-off too, so their
moves measure rounding, not statistics.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["MATCH_KEYS", "compare_fits", "matched_fits"]

#: the columns that identify one kept fit (one data set) of a configuration
MATCH_KEYS = ("truth", "series", "control", "n", "replication")


def matched_fits(old: pd.DataFrame, new: pd.DataFrame, *, loglik_margin: float = 0.5) -> pd.DataFrame:
    """The kept fits of both runs side by side, with the risk's move in units of the margin.

    Parameters
    ----------
    old, new : pandas.DataFrame
        ``results.parquet`` of two runs of one configuration (columns :data:`MATCH_KEYS`, ``risk``,
        ``n_iter``, ``converged``).
    loglik_margin : float
        The near-optimal log-likelihood margin (``fit.near_optimal_loglik``, default 0.5).

    Returns
    -------
    pandas.DataFrame
        One row per fit found in both runs: the keys, ``risk_old``, ``risk_new`` and the other columns
        with those suffixes, ``margin = (2 * loglik_margin / n) * risk_old`` and
        ``moved = (risk_new - risk_old) / margin`` (positive: the new fit is worse).

    Raises
    ------
    ValueError
        A run without one of the needed columns, a fit listed twice in one run, or runs with no fit in
        common.
    """
    keys = list(MATCH_KEYS)
    for label, frame in (("old", old), ("new", new)):
        missing = [c for c in [*keys, "risk", "n_iter", "converged"] if c not in frame.columns]
        if missing:
            raise ValueError(f"the {label} results lack the column(s) {missing}")
        if frame.duplicated(keys).any():
            raise ValueError(f"the {label} results list a fit twice (keys {keys}): not one run of one configuration")
    both = old.merge(new, on=keys, suffixes=("_old", "_new"))
    if both.empty:
        raise ValueError("the two runs have no fit in common: not the same configuration")
    both["margin"] = 2.0 * loglik_margin / both["n"] * both["risk_old"]
    with np.errstate(divide="ignore", invalid="ignore"):
        both["moved"] = (both["risk_new"] - both["risk_old"]) / both["margin"]
    return both


def compare_fits(old: pd.DataFrame, new: pd.DataFrame, *, fraction: float = 0.01,
                 loglik_margin: float = 0.5) -> pd.DataFrame:
    """Per series and control, how many kept fits' risks moved beyond ``fraction`` of the margin.

    Returns
    -------
    pandas.DataFrame
        One row per (series, control) and a row ``series = "all"``: ``fits`` (matched), ``worse`` and
        ``better`` (moved beyond ``fraction`` of the margin up or down), ``worse_share``, ``worse_1``
        and ``better_1`` (beyond one whole margin), ``converged_old``, ``converged_new`` (shares),
        ``iter_old``, ``iter_new`` (mean iterations of the kept fits).
    """
    if not (np.isfinite(fraction) and fraction > 0):
        raise ValueError(f"fraction must be finite and > 0, got {fraction!r}")
    both = matched_fits(old, new, loglik_margin=loglik_margin)

    def summary(group: pd.DataFrame) -> pd.Series:
        moved = group["moved"]
        return pd.Series({
            "fits": len(group),
            "worse": int((moved > fraction).sum()),
            "better": int((moved < -fraction).sum()),
            "worse_share": float((moved > fraction).mean()),
            "worse_1": int((moved > 1).sum()),
            "better_1": int((moved < -1).sum()),
            "converged_old": float(group["converged_old"].mean()),
            "converged_new": float(group["converged_new"].mean()),
            "iter_old": float(group["n_iter_old"].mean()),
            "iter_new": float(group["n_iter_new"].mean()),
        })

    rows = [summary(group).rename((series, control))
            for (series, control), group in both.groupby(["series", "control"], sort=True)]
    rows.append(summary(both).rename(("all", "")))
    table = pd.DataFrame(rows)
    table.index = pd.MultiIndex.from_tuples(table.index, names=["series", "control"])
    return table.reset_index()
