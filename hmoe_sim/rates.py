"""Empirical convergence rates: a power law with a bootstrap interval, against a log law.

Given one loss per fit (long format: several replications per sample size ``n``),
:func:`fit_rate` fits by ordinary least squares

* the power model ``log(loss) = c + slope * log(n)`` (``loss = C n^slope``), and
* the logarithmic model ``log(loss) = c' - tau * log(log n)`` (``loss = C' / log(n)^tau``),

and compares their residual sums of squares on the log scale (both have two parameters, so
the smaller RSS is the better description; ``preferred`` names it). The confidence interval
of the slope (and of ``tau``) is a percentile bootstrap that resamples the replications
*within* each sample size, keeping the design (the set of ``n`` and the count per ``n``)
fixed, as a repeated simulation would.

The same fit serves the effective sample size ``n_eff = n / sigma^2`` of a noise ladder
(:data:`AXES`): there the bootstrap resamples within each (n, sigma) cell (``cells``), two sizes
that reach the same ``n_eff`` are compared by :func:`matched_pairs` (the difference of their median
log losses), and :func:`rate_verdict` gives ``not-equivalent`` when a pair in the upper range
(:func:`upper_range`) disagrees beyond :data:`EQUIVALENCE_MARGIN` (paper_notes/07).

Theorem reference rates (theory.md section 4) are named constants:
:data:`RATE_PARAMETRIC` (``n^-1/2``, singleton-cell parameters, fast case),
:data:`RATE_OVERSPECIFIED` (``n^-1/4``, atoms of multi-atom cells) and
:func:`parametric_log_rate` (``(log n / n)^1/2``, the regression function).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from hmoe_sim._validation import check_choice, check_positive_float, check_positive_int
from hmoe_sim.equivalence import (  # noqa: F401  (re-exported: the n_eff axis beside the rates)
    AXES,
    AXIS_RTOL,
    EQUIVALENCE_MARGIN,
    MatchedPair,
    beyond_margin,
    format_pairs,
    matched_pairs,
    merge_axis_values,
    upper_range,
    worst_pair,
)
from hmoe_sim.verdicts import (  # noqa: F401  (re-exported: the verdict of a rate)
    FLOOR_NEAR,
    FLOOR_TOLERANCE,
    MIN_CONVERGED_FRACTION,
    MIN_DECADES,
    MIN_SIZES,
    ROUND_OFF_FRACTION,
    SPREAD_LIMIT,
    VERDICTS,
    SeriesEvidence,
    Verdict,
    above_round_off,
    rate_verdict,
)

__all__ = [
    "RATE_PARAMETRIC",
    "RATE_OVERSPECIFIED",
    "RateFit",
    "fit_rate",
    "parametric_log_rate",
    "reference_curve",
    "REFERENCE_RATES",
    "VERDICTS",
    "ROUND_OFF_FRACTION",
    "SPREAD_LIMIT",
    "FLOOR_TOLERANCE",
    "MIN_CONVERGED_FRACTION",
    "MIN_SIZES",
    "MIN_DECADES",
    "FLOOR_NEAR",
    "SeriesEvidence",
    "Verdict",
    "rate_verdict",
    "perturbation_exponent",
    "ladder_exponent",
    "AXES",
    "AXIS_RTOL",
    "EQUIVALENCE_MARGIN",
    "MatchedPair",
    "merge_axis_values",
    "upper_range",
    "matched_pairs",
    "worst_pair",
    "beyond_margin",
    "format_pairs",
]
#: exponent of ``n^-1/2`` (parametric rate)
RATE_PARAMETRIC = -0.5
#: exponent of ``n^-1/4`` (over-specified atoms in multi-atom cells)
RATE_OVERSPECIFIED = -0.25


def parametric_log_rate(n: Any) -> np.ndarray:
    """``(log n / n)^{1/2}``: the regression-function rate (up to a constant)."""
    n = np.asarray(n, dtype=np.float64)
    if np.any(~np.isfinite(n)) or np.any(n <= 1):
        raise ValueError(f"n must be finite and > 1, got minimum {float(np.min(n))!r}")
    return np.sqrt(np.log(n) / n)


#: name -> function of ``n`` (unscaled)
REFERENCE_RATES = {
    "n^-1/2": lambda n: np.asarray(n, dtype=np.float64) ** RATE_PARAMETRIC,
    "n^-1/4": lambda n: np.asarray(n, dtype=np.float64) ** RATE_OVERSPECIFIED,
    "(log n/n)^1/2": parametric_log_rate,
    "1/log n": lambda n: 1.0 / np.log(np.asarray(n, dtype=np.float64)),
}


def reference_curve(n: Any, rate: str, *, through: tuple[float, float]) -> np.ndarray:
    """A reference rate scaled to pass through the point ``through = (n0, loss0)``.

    Parameters
    ----------
    n : array-like
        Sample sizes (> 1).
    rate : str
        One of :data:`REFERENCE_RATES` (``"n^-1/2"``, ``"n^-1/4"``, ``"(log n/n)^1/2"``, ``"1/log n"``).
    through : (float, float)
        Anchor point of the curve.
    """
    check_choice("rate", rate, REFERENCE_RATES)
    f = REFERENCE_RATES[rate]
    n0, loss0 = through
    check_positive_float("through loss", float(loss0))
    return float(loss0) * f(n) / f(np.asarray([n0], dtype=np.float64))[0]


@dataclass(frozen=True)
class RateFit:
    """Result of :func:`fit_rate`.

    Attributes
    ----------
    slope, intercept : float
        OLS fit ``log(loss) = intercept + slope * log(n)``.
    ci_low, ci_high : float
        Percentile bootstrap interval of the slope at ``level``.
    level : float
        Confidence level of the intervals.
    n_boot : int
        Bootstrap resamples.
    n_min, n_max : float
        Fitted range of sample sizes.
    n_points : int
        Number of fits used.
    n_sizes : int
        Number of distinct sample sizes.
    tau, log_intercept : float
        Fit of the log model ``log(loss) = log_intercept - tau * log(log n)``.
    tau_ci_low, tau_ci_high : float
        Percentile bootstrap interval of ``tau``.
    rss_power, rss_log : float
        Residual sums of squares of the two fits on the log scale.
    preferred : str
        ``"power"`` or ``"log"``: the model with the smaller RSS.
    """

    slope: float
    intercept: float
    ci_low: float
    ci_high: float
    level: float
    n_boot: int
    n_min: float
    n_max: float
    n_points: int
    n_sizes: int
    tau: float
    log_intercept: float
    tau_ci_low: float
    tau_ci_high: float
    rss_power: float
    rss_log: float
    preferred: str

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for tables)."""
        return asdict(self)

    def predict(self, n: Any) -> np.ndarray:
        """The fitted power law ``exp(intercept) * n^slope``."""
        return np.exp(self.intercept) * np.asarray(n, dtype=np.float64) ** self.slope


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slope, intercept and RSS of ``y ~ x`` along the last axis (``y`` may be batched)."""
    xc = x - x.mean()
    sxx = float(np.sum(xc * xc))
    slope = (y * xc).sum(-1) / sxx
    intercept = y.mean(-1) - slope * x.mean()
    resid = y - intercept[..., None] - slope[..., None] * x
    return slope, intercept, (resid * resid).sum(-1)


def fit_rate(n: Any, loss: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
             cells: Any = None) -> RateFit:
    """Fit ``loss ~ C n^slope`` (with a bootstrap interval) and ``loss ~ C' / log(n)^tau``.

    Parameters
    ----------
    n : array-like
        ``(m,)`` sample size of each fit (integers > 1; at least two distinct values).
    loss : array-like
        ``(m,)`` loss of each fit; finite and positive (filter flagged fits first).
    n_boot : int, default 2000
        Bootstrap resamples (replications resampled with replacement within each ``n``).
    level : float, default 0.95
        Confidence level of the percentile intervals.
    seed : int, default 0
        Seed of the bootstrap.
    cells : array-like, optional
        ``(m,)`` label of each fit's design cell: the bootstrap resamples the fits within each
        cell (default: within each ``n``). On the effective-sample-size axis ``n`` is ``n/sigma^2``
        and a cell is one ``(n, sigma)``, so that two sizes that reach the same ``n/sigma^2``
        are resampled separately, as a repeated simulation would draw them.

    Returns
    -------
    RateFit

    Raises
    ------
    ValueError
        Shapes differ, fewer than two distinct ``n``, ``n <= 1``, or a non-finite or
        non-positive loss (its index is named).
    """
    n_arr = np.asarray(n, dtype=np.float64)
    y_raw = np.asarray(loss, dtype=np.float64)
    if n_arr.ndim != 1 or y_raw.shape != n_arr.shape:
        raise ValueError(f"n and loss must be 1-D of equal length, got shapes {n_arr.shape} and {y_raw.shape}")
    bad = np.flatnonzero(~np.isfinite(y_raw) | (y_raw <= 0))
    if bad.size:
        raise ValueError(f"loss must be finite and positive; entry {bad[0]} is {float(y_raw[bad[0]])!r} "
                         f"({bad.size} bad entries): filter flagged fits before fitting a rate")
    if np.any(~np.isfinite(n_arr)) or np.any(n_arr <= 1):
        raise ValueError(f"n must be finite and > 1 (log log n is used), got minimum {float(np.min(n_arr))!r}")
    sizes = np.unique(n_arr)
    if sizes.size < 2:
        raise ValueError(f"need at least two distinct sample sizes, got {sizes.tolist()}")
    n_boot = check_positive_int("n_boot", n_boot)
    level = check_positive_float("level", level)
    if not level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")

    if cells is None:
        cell_arr = n_arr
    else:
        cell_arr = np.asarray(cells)
        if cell_arr.shape != n_arr.shape:
            raise ValueError(f"cells must have the shape of n {n_arr.shape}, got {cell_arr.shape}")

    order = np.argsort(n_arr, kind="stable")
    n_arr, y, cell_arr = n_arr[order], np.log(y_raw[order]), cell_arr[order]
    x_pow, x_log = np.log(n_arr), np.log(np.log(n_arr))
    slope, intercept, rss_pow = _ols(x_pow, y)
    neg_tau, log_c, rss_log = _ols(x_log, y)

    rng = np.random.default_rng(seed)
    idx = np.empty((n_boot, n_arr.size), dtype=np.int64)
    # cells in order of first appearance along sorted n (for the default cells: ascending n, each contiguous)
    _, first = np.unique(cell_arr, return_index=True)
    for start in np.sort(first):
        rows = np.flatnonzero(cell_arr == cell_arr[start])
        idx[:, rows] = rows[rng.integers(0, rows.size, size=(n_boot, rows.size))]
    y_boot = y[idx]
    boot_slope, _, _ = _ols(x_pow, y_boot)
    boot_tau = -_ols(x_log, y_boot)[0]
    q = [(1 - level) / 2, (1 + level) / 2]
    lo, hi = np.quantile(boot_slope, q)
    tlo, thi = np.quantile(boot_tau, q)
    return RateFit(
        slope=float(slope), intercept=float(intercept), ci_low=float(lo), ci_high=float(hi), level=level,
        n_boot=n_boot, n_min=float(sizes[0]), n_max=float(sizes[-1]), n_points=int(n_arr.size),
        n_sizes=int(sizes.size), tau=float(-neg_tau), log_intercept=float(log_c), tau_ci_low=float(tlo),
        tau_ci_high=float(thi), rss_power=float(rss_pow), rss_log=float(rss_log),
        preferred="power" if rss_pow <= rss_log else "log",
    )




def perturbation_exponent(perturbations: Any, levels: Any) -> float:
    """Exponent ``a`` of ``level ~ C p^a``: how the noise-free control's loss depends on its start.

    A least-squares line through ``(log p, log level)``. About 2 when the control stops on an
    exact flat direction at a distance set by the start (a second-order loss of a first-order
    offset), about 0 when it reaches round-off whatever the start.

    Parameters
    ----------
    perturbations : array-like
        ``(m,)`` distinct positive start perturbations (``m >= 2``).
    levels : array-like
        ``(m,)`` median control loss at each perturbation.

    Returns
    -------
    float
        The exponent; NaN when fewer than two levels are finite and positive.
    """
    p = np.asarray(perturbations, dtype=np.float64)
    v = np.asarray(levels, dtype=np.float64)
    if p.ndim != 1 or v.shape != p.shape:
        raise ValueError(f"perturbations and levels must be 1-D of equal length, got shapes {p.shape} and {v.shape}")
    if np.any(~np.isfinite(p)) or np.any(p <= 0):
        raise ValueError(f"perturbations must be finite and positive, got {p.tolist()}")
    ok = np.isfinite(v) & (v > 0)
    if np.unique(p[ok]).size < 2:
        return float("nan")
    return float(_ols(np.log(p[ok]), np.log(v[ok]))[0])


def ladder_exponent(perturbations: Any, levels: Any, noisy_level: float) -> float:
    """:func:`perturbation_exponent` of a control-perturbation ladder, or NaN when the ladder shows
    round-off.

    The start sets the control's level when the rung of the largest perturbation stops above
    round-off (``level > ROUND_OFF_FRACTION * noisy_level``); the exponent is then fitted over every
    rung, the smaller ones included: how far a start's level falls with the start is what it
    measures, and a level below the round-off line of a *large* noisy loss (a non-identified class
    whose noisy estimates wander far) can still be set by the start. When the widest rung is at
    round-off, so is every rung, and a ratio of round-off levels is round-off: NaN.

    Parameters
    ----------
    perturbations : array-like
        ``(m,)`` distinct positive start perturbations.
    levels : array-like
        ``(m,)`` median control loss at each perturbation (at the largest n).
    noisy_level : float
        The noisy series' median loss at the same n (the scale of the round-off line).

    Returns
    -------
    float
        The exponent, or NaN (round-off, fewer than two usable rungs, or no noisy level).
    """
    p = np.asarray(perturbations, dtype=np.float64)
    v = np.asarray(levels, dtype=np.float64)
    if p.ndim != 1 or v.shape != p.shape or p.size == 0:
        raise ValueError(f"perturbations and levels must be 1-D of equal, positive length, got shapes "
                         f"{p.shape} and {v.shape}")
    widest = float(v[int(np.argmax(p))])
    if not above_round_off(widest, noisy_level):
        return float("nan")
    return perturbation_exponent(p, v)
