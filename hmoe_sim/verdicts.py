"""The verdict of a fitted slope: whether it is a statistical rate, and the evidence that decided.

:func:`rate_verdict` reads a :class:`SeriesEvidence` (what ``rates.csv`` knows about one series,
loss and axis: the slopes and their CIs, the optimiser's record, the noise-free control, the class's
loss floor, the matched sizes of the ``n_eff`` axis) and gives the first of :data:`VERDICTS` that
applies, with the test that decided it in words (paper_notes/07, section "Verdicts").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from hmoe_sim._validation import check_choice
from hmoe_sim.equivalence import AXES, EQUIVALENCE_MARGIN, beyond_margin, format_ci

__all__ = ["VERDICTS", "ROUND_OFF_FRACTION", "SPREAD_LIMIT", "FLOOR_TOLERANCE", "MIN_CONVERGED_FRACTION",
           "MIN_SIZES", "MIN_DECADES", "FLOOR_NEAR", "SeriesEvidence", "Verdict", "rate_verdict",
           "above_round_off"]

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


def above_round_off(level: float, noisy_level: float) -> bool:
    """Whether a control ``level`` lies above the round-off line of the noisy loss (False for NaN)."""
    return bool(np.isfinite(level) and level > ROUND_OFF_FRACTION * noisy_level)


def _inside(value: float, low: float, high: float) -> bool:
    return bool(np.isfinite(value) and np.isfinite(low) and np.isfinite(high) and low <= value <= high)


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
        return Verdict("no-decay", f"slope {e.slope:+.2f} {format_ci(e.ci_low, e.ci_high)}: the CI reaches 0")
    check_choice("axis", e.axis, AXES)
    on_n = e.axis == "n"
    decades = float(np.log10(e.n_max / e.n_min)) if e.n_min > 0 else 0.0
    if e.n_sizes < MIN_SIZES or decades < MIN_DECADES - 1e-9:
        what = "sizes" if on_n else "values of n_eff"
        return Verdict("short-range", f"{e.n_sizes} {what} over {decades:.2f} decades of {e.axis} "
                                      f"(needs {MIN_SIZES} over {MIN_DECADES:g})")
    if beyond_margin(e.equivalence_ci_low, e.equivalence_ci_high):
        return Verdict("not-equivalent", f"two sizes at the same n_eff differ by {e.equivalence_diff:+.2f} "
                                         f"{format_ci(e.equivalence_ci_low, e.equivalence_ci_high)} in median log "
                                         "loss, "
                                         f"beyond +-log 2 = {EQUIVALENCE_MARGIN:.2f}: the loss is not a function "
                                         "of n/sigma^2 alone")
    upper_known = bool(np.isfinite(e.upper_ci_low) and np.isfinite(e.upper_ci_high))
    if not upper_known or e.upper_ci_high < e.ci_low or e.upper_ci_low > e.ci_high:
        return Verdict("pre-asymptotic", f"whole-range CI {format_ci(e.ci_low, e.ci_high)} and upper-half CI "
                                         f"{format_ci(e.upper_ci_low, e.upper_ci_high)} do not overlap")
    above = above_round_off(e.control_level, e.noisy_level)
    if above and _inside(e.slope, e.control_ci_low, e.control_ci_high):
        return Verdict("noise-free-artefact",
                       f"slope {e.slope:+.2f} inside the noise-free control's CI "
                       f"{format_ci(e.control_ci_low, e.control_ci_high)}, control at {e.control_level:.2g} "
                       f"(noisy {e.noisy_level:.2g}), above round-off")
    if np.isfinite(e.spread_ratio) and e.spread_ratio > SPREAD_LIMIT:
        return Verdict("set-valued", f"near-optimal starts disagree: spread ratio {e.spread_ratio:.2g} "
                                     f"> {SPREAD_LIMIT:g}")
    if np.isfinite(e.worst_ci_low) and not (np.isfinite(e.worst_ci_high) and e.worst_ci_high < 0.0):
        return Verdict("set-valued", f"the worst near-optimal loss does not decay: CI "
                                     f"{format_ci(e.worst_ci_low, e.worst_ci_high)}")
    if above and not (np.isfinite(e.control_ci_high) and e.control_ci_high < 0.0):
        return Verdict("set-valued", f"without noise the fits stay at {e.control_level:.2g} (control CI "
                                     f"{format_ci(e.control_ci_low, e.control_ci_high)} reaches 0): the estimator "
                                     "lands on a set, not a point")
    if np.isfinite(e.loss_floor) and e.loss_floor > FLOOR_TOLERANCE and e.noisy_level <= FLOOR_NEAR * e.loss_floor:
        at = f"n = {e.n_max:.0f}" if on_n else f"n_eff = {e.n_max:.3g}"
        return Verdict("floor", f"noisy loss {e.noisy_level:.2g} at {at} within {FLOOR_NEAR:g}x of "
                                f"the class floor {e.loss_floor:.2g}")
    counted = f"{e.n_sizes} sizes" if on_n else f"{e.n_sizes} values of n_eff"
    return Verdict("rate", f"slope {e.slope:+.2f} {format_ci(e.ci_low, e.ci_high)} over {counted} "
                           f"({decades:.1f} decades), upper-half CI overlaps; "
                           + ("" if on_n or not np.isfinite(e.equivalence_diff) else
                              f"matched sizes agree (worst {e.equivalence_diff:+.2f} "
                              f"{format_ci(e.equivalence_ci_low, e.equivalence_ci_high)}); ")
                           + "control "
                           + ("at round-off" if not above else
                              f"slope CI {format_ci(e.control_ci_low, e.control_ci_high)} excludes it"))
