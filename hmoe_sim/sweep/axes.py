"""The axes a sweep's rates are fitted on: the sample size n, and n/sigma^2 on a noise ladder.

A series whose noisy fits have several noise levels at some n (:func:`has_noise_axis`) is fitted
on ``n`` at its largest sigma (:func:`fixed_noise`) and on ``n_eff = n / sigma^2`` over every
(n, sigma) (:func:`axis_values`; the bootstrap resamples within :func:`bootstrap_cells`); two
sizes that reach the same ``n_eff`` are compared (:func:`equivalence_columns`). ``summary.csv``
has one row per noise level of a ladder (:func:`noise_cells`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from hmoe_sim.equivalence import format_pairs, matched_pairs, merge_axis_values, upper_range, worst_pair

__all__ = ["AXIS_COLUMN", "has_noise_axis", "fixed_noise", "axis_values", "bootstrap_cells", "equivalence_columns",
           "noise_cells"]

#: the column of a series' rows that holds the value of the axis a rate is fitted on (added by :func:`axis_values`)
AXIS_COLUMN = "axis_value"


def has_noise_axis(part: pd.DataFrame) -> bool:
    """Whether the fits have several noise levels ``noise_std`` at some sample size (a noise ladder)."""
    if "noise_std" not in part or part.empty:
        return False
    return bool((part.groupby("n")["noise_std"].nunique() > 1).any())


def fixed_noise(part: pd.DataFrame) -> pd.DataFrame:
    """The fits of a series at one noise level: all of them, or on a noise ladder those at the largest ``noise_std``.

    The ``n`` axis of a run with a noise ladder is the fixed-noise sweep at the ladder's largest
    sigma (the level an n-sweep alone would use); pooling several sigma on ``n`` would mix two axes.
    """
    if not has_noise_axis(part):
        return part
    return part[part["noise_std"] == part["noise_std"].max()]


def axis_values(part: pd.DataFrame, axis: str) -> pd.DataFrame:
    """``part`` with :data:`AXIS_COLUMN`: ``n``, or ``n_eff = n / sigma^2`` merged within
    :data:`hmoe_sim.equivalence.AXIS_RTOL`.

    ``n_eff`` is read from the column ``n_eff`` when present, else computed from ``noise_std``.
    """
    if axis == "n":
        return part.assign(**{AXIS_COLUMN: part["n"].to_numpy(dtype=float)})
    if axis != "n_eff":
        raise ValueError(f"axis must be 'n' or 'n_eff', got {axis!r}")
    if "n_eff" in part:
        values = part["n_eff"].to_numpy(dtype=float)
    else:
        values = part["n"].to_numpy(dtype=float) / part["noise_std"].to_numpy(dtype=float) ** 2
    return part.assign(**{AXIS_COLUMN: merge_axis_values(values)})


def bootstrap_cells(part: pd.DataFrame) -> np.ndarray:
    """Bootstrap cells of a rate fit: one per ``(n, axis value)``: per n on the n axis, per (n, sigma) on n_eff."""
    return pd.MultiIndex.from_arrays([part["n"], part[AXIS_COLUMN]]).factorize()[0]


def equivalence_columns(main: pd.DataFrame, ok: pd.Series, loss: str, n_boot: int, level: float) -> dict[str, object]:
    """Matched sizes of one row: every pair of sizes at the same n_eff, and the worst in the upper range.

    Columns ``equivalence`` (:func:`hmoe_sim.equivalence.format_pairs` of every pair), ``n_matched``,
    ``n_matched_upper`` (pairs whose n_eff is in :func:`hmoe_sim.equivalence.upper_range` of the
    series' n_eff values) and ``equivalence_n_eff, equivalence_diff, equivalence_ci_low,
    equivalence_ci_high`` (:func:`hmoe_sim.equivalence.worst_pair` of the upper range). On the n axis
    no two sizes share a value: empty and NaN.
    """
    kept = main[ok]
    pairs = matched_pairs(kept["n"].to_numpy(dtype=float), kept[AXIS_COLUMN].to_numpy(dtype=float),
                          kept[loss].to_numpy(dtype=float), n_boot=n_boot, level=level, seed=0)
    upper_values = set(upper_range(main[AXIS_COLUMN])) if len(main) else set()
    upper = [p for p in pairs if p.n_eff in upper_values]
    worst = worst_pair(upper)
    row: dict[str, object] = {"equivalence": format_pairs(pairs), "n_matched": len(pairs),
                              "n_matched_upper": len(upper)}
    for name in ("n_eff", "diff", "ci_low", "ci_high"):
        row[f"equivalence_{name}"] = getattr(worst, name) if worst is not None else np.nan
    return row


def noise_cells(rows: pd.DataFrame, sizes: list[int], ladder: bool) -> Iterator[tuple[int, float, pd.DataFrame]]:
    """``(n, sigma, fits)`` per size, and on a noise ladder per noise level of the size (descending sigma).

    Without a ladder ``sigma`` is NaN and every fit at ``n`` is one cell; a size without fits
    gives one empty cell (so that a missing size shows in the table).
    """
    for n in sizes:
        part = rows[rows["n"] == n]
        levels = sorted(part["noise_std"].unique(), reverse=True) if ladder and len(part) else []
        if not levels:
            yield n, (0.0 if ladder else np.nan), part
        for sigma in levels:
            yield n, float(sigma), part[part["noise_std"] == sigma]
