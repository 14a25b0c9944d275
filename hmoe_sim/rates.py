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
from typing import Any, NamedTuple

import numpy as np

from hmoe_sim._validation import check_choice, check_positive_float, check_positive_int

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


#: verdicts, in the order they are tested (the first that applies is given)
VERDICTS = ("unchecked", "optimisation-limited", "no-decay", "short-range", "not-equivalent", "pre-asymptotic",
            "noise-free-artefact", "set-valued", "floor", "rate")
#: a control loss at or below this fraction of the noisy loss (same n) has fallen to round-off.
#: Round-off of a loss is not float64 epsilon: on a second-order flat direction a fit that
#: reproduces ``f*`` to 1e-16 leaves its atoms 1e-8 off, so D2 (first power of distances) sits at
#: 1e-8 to 1e-6 of the noisy level while D1 (squared) sits at 1e-14. Controls stopped by their
#: start sit at 3e-4 (perturbation 0.01) and above. The line lies two decades from either.
ROUND_OFF_FRACTION = 1e-5
#: identification spread ``median (max - min) / best`` above which the estimate is set-valued
SPREAD_LIMIT = 0.5
#: a loss floor at or below this is round-off of an exact zero (losses are of order one at the truths' scales)
FLOOR_TOLERANCE = 1e-10
#: at least this fraction of the kept noisy fits must have converged (and as many not be worse than the truth)
MIN_CONVERGED_FRACTION = 0.8
#: a rate needs at least this many sample sizes ...
MIN_SIZES = 4
#: ... spanning at least this many decades of n
MIN_DECADES = 1.0
#: a noisy loss within this factor of a positive class floor (at the largest n) is "near the floor"
FLOOR_NEAR = 10.0
#: the axes a rate is fitted on: the sample size ``n``, and the effective sample size ``n_eff = n / sigma^2``
AXES = ("n", "n_eff")
#: two axis values within this relative difference are the same value (``n/sigma^2`` computed from two
#: sizes and two noise levels that reach it agree to rounding, not exactly)
AXIS_RTOL = 1e-9
#: two sizes at the same ``n_eff`` disagree when the difference of their median log losses is beyond
#: ``log 2`` (a factor 2 in the loss) with its whole CI: at the parametric slope ``-1/2`` a factor 2
#: is what a factor 4 in ``n_eff`` makes, more than half a decade of the axis, so a series that
#: misses it is not described by ``n_eff`` alone at the resolution a slope over a few decades needs
EQUIVALENCE_MARGIN = float(np.log(2.0))


def _above_round_off(level: float, noisy_level: float) -> bool:
    """Whether a control ``level`` lies above the round-off line of the noisy loss (False for NaN)."""
    return bool(np.isfinite(level) and level > ROUND_OFF_FRACTION * noisy_level)


def _inside(value: float, low: float, high: float) -> bool:
    return bool(np.isfinite(value) and np.isfinite(low) and np.isfinite(high) and low <= value <= high)


def _ci(low: float, high: float) -> str:
    return f"[{low:+.2f}, {high:+.2f}]"


@dataclass(frozen=True)
class SeriesEvidence:
    """Everything :func:`rate_verdict` reads about one (truth, series, loss) row of ``rates.csv``.

    Attributes
    ----------
    has_control : bool
        A noise-free control of the series was fitted.
    truth_free_starts : bool
        The estimate was chosen among starts that include truth-free (random) ones, or the series'
        protocol *is* its start (``protocol_start``).
    protocol_start : bool
        The start and the iteration budget are the protocol under test (e.g. the papers' SGD):
        such a series is judged by its control and never by its convergence.
    slope, ci_low, ci_high : float
        The noisy slope over the whole range and its CI.
    n_sizes : int
        Distinct sample sizes with a usable fit.
    n_min, n_max : float
        Smallest and largest of them.
    upper_ci_low, upper_ci_high : float
        CI of the slope over the upper half of the n grid.
    converged_fraction : float
        Fraction of the kept noisy fits whose optimiser reported convergence.
    worse_fraction : float
        Fraction of the noisy fits whose empirical risk exceeds the truth's on the same data by
        more than the near-optimal margin (the optimiser missed a better point it could see).
    control_ci_low, control_ci_high : float
        CI of the noise-free control's slope.
    control_level, noisy_level : float
        Median control loss and median noisy loss at the largest n.
    loss_floor : float
        Largest loss over the exact representations of the truth in the fitted class
        (:func:`hmoe_sim.identifiability.loss_floor`): positive when the class does not identify
        the parameters through ``f``.
    spread_ratio : float
        Median over fits of ``(max - min) / best`` loss over the near-optimal starts.
    worst_ci_low, worst_ci_high : float
        CI of the slope of the largest near-optimal loss.
    protocol_start : bool
        The series' protocol is its start (see ``truth_free_starts``).
    axis : str
        ``"n"`` or ``"n_eff"`` (:data:`AXES`): what ``n_sizes``, ``n_min``, ``n_max`` count and
        the slopes are fitted against.
    equivalence_diff, equivalence_ci_low, equivalence_ci_high : float
        The worst matched pair in the upper range of the axis (:func:`worst_pair`): the difference
        of the median log losses of two sizes at the same ``n_eff`` and its CI; NaN without a pair.
    """

    has_control: bool
    truth_free_starts: bool
    slope: float
    ci_low: float
    ci_high: float
    n_sizes: int
    n_min: float
    n_max: float
    upper_ci_low: float
    upper_ci_high: float
    converged_fraction: float
    worse_fraction: float
    control_ci_low: float
    control_ci_high: float
    control_level: float
    noisy_level: float
    loss_floor: float
    spread_ratio: float
    worst_ci_low: float
    worst_ci_high: float
    protocol_start: bool = False
    axis: str = "n"
    equivalence_diff: float = float("nan")
    equivalence_ci_low: float = float("nan")
    equivalence_ci_high: float = float("nan")


class Verdict(NamedTuple):
    """A verdict of :data:`VERDICTS` and, in words, the evidence that decided it."""

    verdict: str
    evidence: str


def _optimisation(e: SeriesEvidence) -> str:
    if e.protocol_start:
        return ""
    if not (np.isfinite(e.converged_fraction) and e.converged_fraction >= MIN_CONVERGED_FRACTION):
        return (f"{e.converged_fraction:.0%} of the kept noisy fits converged "
                f"(needs {MIN_CONVERGED_FRACTION:.0%})")
    if not (np.isfinite(e.worse_fraction) and e.worse_fraction <= 1 - MIN_CONVERGED_FRACTION):
        return (f"{e.worse_fraction:.0%} of the noisy fits end worse than the truth beyond the near-optimal margin "
                f"(at most {1 - MIN_CONVERGED_FRACTION:.0%} allowed)")
    return ""


def rate_verdict(e: SeriesEvidence) -> Verdict:
    """Whether a fitted slope is a statistical rate: the first of :data:`VERDICTS` that applies.

    1. ``unchecked``: no noise-free control, or no truth-free start (only near-truth starts, whose
       result a start perturbation alone can move), or no slope could be fitted;
    2. ``optimisation-limited``: fewer than 80% of the kept noisy fits converged, or more than 20%
       end worse than the truth beyond the near-optimal margin (skipped for a series whose
       protocol is its start, ``protocol_start``);
    3. ``no-decay``: the slope's CI reaches 0 or above, or is not finite;
    4. ``short-range``: fewer than :data:`MIN_SIZES` sizes, or less than :data:`MIN_DECADES`
       decade of n;
    5. ``not-equivalent``: two sizes that reach the same ``n_eff`` in the upper range of the axis
       disagree: the worst matched pair's CI of the difference of median log losses lies
       entirely beyond :data:`EQUIVALENCE_MARGIN` (:func:`beyond_margin`). Only rows with such
       pairs (the ``n_eff`` axis) can get it. It comes before the tests that read the slopes'
       shape and the controls: where the loss is not a function of ``n_eff`` alone, a slope on
       ``n_eff`` mixes the curves of the sizes and its bending is that of the mixture;
    6. ``pre-asymptotic``: the CIs of the whole-range slope and of the upper-half slope do not
       overlap (or the upper half has no CI): the loss is still bending over the range;
    7. ``noise-free-artefact``: the slope lies inside the noise-free control's CI and the
       control has not fallen to round-off (``control_level > 1e-5 * noisy_level``): the
       protocol makes the slope, not the noise;
    8. ``set-valued``: the near-optimal starts (random ones included) disagree
       (``spread_ratio > 0.5``), or the worst near-optimal loss has a CI that reaches 0, or the
       noise-free control stays above round-off without decaying (its CI reaches 0): without
       noise the estimator lands on a set of exact representations, not on the truth;
    9. ``floor``: the class has a positive floor (``loss_floor > 1e-10``) and the noisy loss at
       the largest n is within a factor :data:`FLOOR_NEAR` of it;
    10. ``rate``: none of the above.

    On the ``n_eff`` axis sizes, decades and the largest value are counted on ``n_eff``.

    Parameters
    ----------
    e : SeriesEvidence
        The row's evidence.

    Returns
    -------
    Verdict
        ``(verdict, evidence)``; ``evidence`` names the test that decided and its numbers.
    """
    if not e.has_control:
        return Verdict("unchecked", "no noise-free control was fitted")
    if not e.truth_free_starts:
        return Verdict("unchecked", "no truth-free (random) start: the estimate depends on the near-truth start")
    if not np.isfinite(e.slope):
        return Verdict("unchecked", "no slope could be fitted (fewer than two sizes with usable fits)")
    why = _optimisation(e)
    if why:
        return Verdict("optimisation-limited", why)
    if not (np.isfinite(e.ci_low) and np.isfinite(e.ci_high) and e.ci_high < 0.0):
        return Verdict("no-decay", f"slope {e.slope:+.2f} {_ci(e.ci_low, e.ci_high)}: the CI reaches 0")
    check_choice("axis", e.axis, AXES)
    on_n = e.axis == "n"
    decades = float(np.log10(e.n_max / e.n_min)) if e.n_min > 0 else 0.0
    if e.n_sizes < MIN_SIZES or decades < MIN_DECADES - 1e-9:
        what = "sizes" if on_n else "values of n_eff"
        return Verdict("short-range", f"{e.n_sizes} {what} over {decades:.2f} decades of {e.axis} "
                                      f"(needs {MIN_SIZES} over {MIN_DECADES:g})")
    if beyond_margin(e.equivalence_ci_low, e.equivalence_ci_high):
        return Verdict("not-equivalent", f"two sizes at the same n_eff differ by {e.equivalence_diff:+.2f} "
                                         f"{_ci(e.equivalence_ci_low, e.equivalence_ci_high)} in median log loss, "
                                         f"beyond +-log 2 = {EQUIVALENCE_MARGIN:.2f}: the loss is not a function "
                                         "of n/sigma^2 alone")
    upper_known = bool(np.isfinite(e.upper_ci_low) and np.isfinite(e.upper_ci_high))
    if not upper_known or e.upper_ci_high < e.ci_low or e.upper_ci_low > e.ci_high:
        return Verdict("pre-asymptotic", f"whole-range CI {_ci(e.ci_low, e.ci_high)} and upper-half CI "
                                         f"{_ci(e.upper_ci_low, e.upper_ci_high)} do not overlap")
    above_round_off = _above_round_off(e.control_level, e.noisy_level)
    if above_round_off and _inside(e.slope, e.control_ci_low, e.control_ci_high):
        return Verdict("noise-free-artefact",
                       f"slope {e.slope:+.2f} inside the noise-free control's CI "
                       f"{_ci(e.control_ci_low, e.control_ci_high)}, control at {e.control_level:.2g} "
                       f"(noisy {e.noisy_level:.2g}), above round-off")
    if np.isfinite(e.spread_ratio) and e.spread_ratio > SPREAD_LIMIT:
        return Verdict("set-valued", f"near-optimal starts disagree: spread ratio {e.spread_ratio:.2g} "
                                     f"> {SPREAD_LIMIT:g}")
    if np.isfinite(e.worst_ci_low) and not (np.isfinite(e.worst_ci_high) and e.worst_ci_high < 0.0):
        return Verdict("set-valued", f"the worst near-optimal loss does not decay: CI "
                                     f"{_ci(e.worst_ci_low, e.worst_ci_high)}")
    if above_round_off and not (np.isfinite(e.control_ci_high) and e.control_ci_high < 0.0):
        return Verdict("set-valued", f"without noise the fits stay at {e.control_level:.2g} (control CI "
                                     f"{_ci(e.control_ci_low, e.control_ci_high)} reaches 0): the estimator "
                                     "lands on a set, not a point")
    if np.isfinite(e.loss_floor) and e.loss_floor > FLOOR_TOLERANCE and e.noisy_level <= FLOOR_NEAR * e.loss_floor:
        at = f"n = {e.n_max:.0f}" if on_n else f"n_eff = {e.n_max:.3g}"
        return Verdict("floor", f"noisy loss {e.noisy_level:.2g} at {at} within {FLOOR_NEAR:g}x of "
                                f"the class floor {e.loss_floor:.2g}")
    counted = f"{e.n_sizes} sizes" if on_n else f"{e.n_sizes} values of n_eff"
    return Verdict("rate", f"slope {e.slope:+.2f} {_ci(e.ci_low, e.ci_high)} over {counted} "
                           f"({decades:.1f} decades), upper-half CI overlaps; "
                           + ("" if on_n or not np.isfinite(e.equivalence_diff) else
                              f"matched sizes agree (worst {e.equivalence_diff:+.2f} "
                              f"{_ci(e.equivalence_ci_low, e.equivalence_ci_high)}); ")
                           + "control "
                           + ("at round-off" if not above_round_off else
                              f"slope CI {_ci(e.control_ci_low, e.control_ci_high)} excludes it"))


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
    if not _above_round_off(widest, noisy_level):
        return float("nan")
    return perturbation_exponent(p, v)


# ---------------------------------------------------------------------- the effective sample size n / sigma^2


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
                     f"{_ci(p.ci_low, p.ci_high)}" + (" !" if beyond_margin(p.ci_low, p.ci_high) else "")
                     for p in pairs)
