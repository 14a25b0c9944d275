"""The effective sample size ``n_eff = n / sigma^2``: its values, its upper range, and two sizes that reach it.

A noise ladder (several noise levels ``sigma`` per sample size ``n``) puts every fit on the axis
``n / sigma^2``, on which the least-squares estimate depends to first order (paper_notes/07).
:func:`merge_axis_values` makes the values that two (n, sigma) reach to rounding one value,
:func:`upper_range` is the upper half of an axis (the range of ``slope_upper``), and
:func:`matched_pairs` compares two sizes at the same ``n_eff``: the difference of their median log
losses with a bootstrap CI. A pair whose CI lies beyond :data:`EQUIVALENCE_MARGIN`
(:func:`beyond_margin`) is the evidence of the verdict ``not-equivalent``
(:func:`hmoe_sim.verdicts.rate_verdict`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hmoe_sim._validation import check_positive_int

__all__ = ["AXES", "AXIS_RTOL", "EQUIVALENCE_MARGIN", "MatchedPair", "merge_axis_values", "upper_range",
           "matched_pairs", "worst_pair", "beyond_margin", "format_pairs", "format_ci"]

#: the axes a rate is fitted on: the sample size ``n``, and the effective sample size ``n_eff = n / sigma^2``
AXES = ("n", "n_eff")
#: two axis values within this relative difference are the same value (``n/sigma^2`` computed from two
#: sizes and two noise levels that reach it agree to rounding, not exactly)
AXIS_RTOL = 1e-9
#: two sizes at the same ``n_eff`` disagree when the difference of their median log losses is beyond
#: ``log 2`` (a factor 2 in the loss) with its whole CI. An offset ``delta`` between the sizes moves a
#: least-squares slope by ``delta cov(1[n = n_large], log x) / var(log x)``: on the headline ladder
#: (n = 1e3, 1e4; n/sigma^2 = 4e5..4e10) at most 0.15 for ``delta = log 2`` over the upper half, less
#: than the contrast under test (paper_notes/07)
EQUIVALENCE_MARGIN = float(np.log(2.0))


def format_ci(low: float, high: float) -> str:
    """An interval as ``"[-0.60, -0.40]"``."""
    return f"[{low:+.2f}, {high:+.2f}]"


def merge_axis_values(values: Any, rtol: float = AXIS_RTOL) -> np.ndarray:
    """Each value replaced by the smallest value of its run of values within relative ``rtol``.

    Sorted ascending, a value within ``rtol`` (relative to itself) of the previous representative
    joins it; otherwise it starts a new one. ``n/sigma^2`` reached by two (n, sigma) pairs then
    is one value exactly.

    Parameters
    ----------
    values : array-like
        ``(m,)`` finite positive values.
    rtol : float
        Relative tolerance.

    Returns
    -------
    numpy.ndarray
        ``(m,)`` float64, in the input order.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {v.shape}")
    bad = np.flatnonzero(~np.isfinite(v) | (v <= 0))
    if bad.size:
        raise ValueError(f"axis values must be finite and positive; entry {bad[0]} is {float(v[bad[0]])!r} "
                         "(a noise-free fit has n/sigma^2 = inf: keep controls off the n_eff axis)")
    out = v.copy()
    order = np.argsort(v, kind="stable")
    representative = np.nan
    for i in order:
        if not (np.isfinite(representative) and v[i] - representative <= rtol * v[i]):
            representative = v[i]
        out[i] = representative
    return out


def upper_range(values: Any) -> np.ndarray:
    """The upper half of an axis: of the distinct values sorted, the last ``ceil(m/2)`` (``values[m // 2:]``).

    On a log-spaced grid these are the values with ``log(value)`` at or above the midpoint of the
    log range; the rule is a count so that rounding of a grid (``3107`` for ``10^3.5``) cannot move a
    value across the midpoint. Distinct values are counted after :func:`merge_axis_values`.

    Parameters
    ----------
    values : array-like
        The axis values of the design (repeats allowed).

    Returns
    -------
    numpy.ndarray
        The distinct values of the upper half, ascending.
    """
    distinct = np.unique(merge_axis_values(np.asarray(values, dtype=np.float64).ravel()))
    return distinct[distinct.size // 2:]


@dataclass(frozen=True)
class MatchedPair:
    """Two sample sizes that reach the same ``n_eff = n / sigma^2``, compared.

    Attributes
    ----------
    n_eff : float
        The common effective sample size.
    n_small, n_large : float
        The two sizes (``n_small < n_large``).
    diff : float
        Median log loss at ``n_large`` minus median log loss at ``n_small``.
    ci_low, ci_high : float
        Percentile bootstrap interval of ``diff`` (replications resampled within each of the two cells).
    count_small, count_large : int
        Fits in each cell.
    """

    n_eff: float
    n_small: float
    n_large: float
    diff: float
    ci_low: float
    ci_high: float
    count_small: int
    count_large: int

    @property
    def separation(self) -> float:
        """How far the CI lies from 0 (``max(ci_low, -ci_high)``; negative when it covers 0)."""
        return float(max(self.ci_low, -self.ci_high))


def matched_pairs(n: Any, n_eff: Any, loss: Any, *, n_boot: int = 2000, level: float = 0.95,
                  seed: int = 0) -> list[MatchedPair]:
    """Every pair of sizes that reach the same ``n_eff`` (within :data:`AXIS_RTOL`), compared.

    A cell is one ``(n, n_eff)`` (equivalently one ``(n, sigma)``). For every ``n_eff`` reached by
    two or more sizes, every pair of them gives the difference of their median log losses (larger
    ``n`` minus smaller) and a percentile bootstrap CI that resamples the fits within each cell.
    To first order the least-squares estimate depends on ``(n, sigma)`` through ``n / sigma^2``
    only (paper_notes/07), so the difference is about 0 where that holds.

    Parameters
    ----------
    n, n_eff, loss : array-like
        ``(m,)`` per fit: sample size, ``n / sigma^2`` and loss (finite and positive).
    n_boot, level, seed
        Bootstrap resamples, confidence level and seed (one generator for all pairs, in
        ascending ``n_eff`` then ``n``).

    Returns
    -------
    list of MatchedPair
        Ascending in ``n_eff``, then in the two sizes.
    """
    n_arr = np.asarray(n, dtype=np.float64)
    y_raw = np.asarray(loss, dtype=np.float64)
    ne = np.asarray(n_eff, dtype=np.float64)
    if n_arr.ndim != 1 or y_raw.shape != n_arr.shape or ne.shape != n_arr.shape:
        raise ValueError(f"n, n_eff and loss must be 1-D of equal length, got shapes {n_arr.shape}, {ne.shape} "
                         f"and {y_raw.shape}")
    bad = np.flatnonzero(~np.isfinite(y_raw) | (y_raw <= 0))
    if bad.size:
        raise ValueError(f"loss must be finite and positive; entry {bad[0]} is {float(y_raw[bad[0]])!r}")
    n_boot = check_positive_int("n_boot", n_boot)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if n_arr.size == 0:
        return []
    ne = merge_axis_values(ne)
    y = np.log(y_raw)
    rng = np.random.default_rng(seed)
    q = [(1 - level) / 2, (1 + level) / 2]
    pairs = []
    for value in np.unique(ne):
        sizes = np.unique(n_arr[ne == value])
        cells = {size: y[(ne == value) & (n_arr == size)] for size in sizes}
        boot = {size: np.median(v[rng.integers(0, v.size, size=(n_boot, v.size))], axis=1)
                for size, v in cells.items()}
        for i, small in enumerate(sizes):
            for large in sizes[i + 1:]:
                draws = boot[large] - boot[small]
                lo, hi = np.quantile(draws, q)
                pairs.append(MatchedPair(
                    n_eff=float(value), n_small=float(small), n_large=float(large),
                    diff=float(np.median(cells[large]) - np.median(cells[small])), ci_low=float(lo),
                    ci_high=float(hi), count_small=int(cells[small].size), count_large=int(cells[large].size)))
    return pairs


def worst_pair(pairs: list[MatchedPair]) -> MatchedPair | None:
    """The pair whose CI lies furthest from 0 (largest :attr:`MatchedPair.separation`; ties: larger ``|diff|``).

    It decides :func:`beyond_margin` for the whole list: if any pair's CI lies beyond the margin,
    this one's does. ``None`` for no pair.
    """
    if not pairs:
        return None
    return max(pairs, key=lambda p: (p.separation, abs(p.diff)))


def beyond_margin(ci_low: float, ci_high: float, margin: float = EQUIVALENCE_MARGIN) -> bool:
    """Whether a CI of a difference of log losses lies entirely outside ``[-margin, +margin]`` (False for NaN)."""
    if not (np.isfinite(ci_low) and np.isfinite(ci_high)):
        return False
    return bool(ci_low > margin or ci_high < -margin)


def format_pairs(pairs: list[MatchedPair]) -> str:
    """Matched pairs as ``"n_eff 4e+08, n 1000|10000: +0.12 [-0.30, +0.51]"`` joined by ``"; "`` (``""`` for none).

    A pair whose CI lies beyond :data:`EQUIVALENCE_MARGIN` ends with ``" !"``.
    """
    return "; ".join(f"n_eff {p.n_eff:.3g}, n {p.n_small:.0f}|{p.n_large:.0f}: {p.diff:+.2f} "
                     f"{format_ci(p.ci_low, p.ci_high)}" + (" !" if beyond_margin(p.ci_low, p.ci_high) else "")
                     for p in pairs)

