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
    "rate_verdict",
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


def fit_rate(n: Any, loss: Any, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> RateFit:
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

    order = np.argsort(n_arr, kind="stable")
    n_arr, y = n_arr[order], np.log(y_raw[order])
    x_pow, x_log = np.log(n_arr), np.log(np.log(n_arr))
    slope, intercept, rss_pow = _ols(x_pow, y)
    neg_tau, log_c, rss_log = _ols(x_log, y)

    rng = np.random.default_rng(seed)
    idx = np.empty((n_boot, n_arr.size), dtype=np.int64)
    start = 0
    for size in sizes:
        count = int(np.sum(n_arr == size))
        idx[:, start:start + count] = start + rng.integers(0, count, size=(n_boot, count))
        start += count
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
VERDICTS = ("unchecked", "noise-free-artefact", "floor", "set-valued", "no-decay", "rate")
#: a control loss at or below this fraction of the noisy loss (same n) has fallen to round-off
ROUND_OFF_FRACTION = 1e-8
#: identification spread ``median (max - min) / best`` above which the estimate is set-valued
SPREAD_LIMIT = 0.5
#: a loss floor at or below this is round-off of an exact zero (losses are of order one at the truths' scales)
FLOOR_TOLERANCE = 1e-10


def _inside(value: float, low: float, high: float) -> bool:
    return bool(np.isfinite(value) and np.isfinite(low) and np.isfinite(high) and low <= value <= high)


def rate_verdict(*, checked: bool, slope: float, ci: tuple[float, float], control_ci: tuple[float, float],
                 control_level: float, noisy_level: float, loss_floor: float, spread_ratio: float,
                 worst_ci: tuple[float, float]) -> str:
    """Whether a fitted slope is a statistical rate: the first of :data:`VERDICTS` that applies.

    1. ``unchecked``: no noise-free control, or one start and no random starts (``checked``
       false), or no slope could be fitted;
    2. ``noise-free-artefact``: the noisy slope lies inside the noise-free control's CI and the
       control's loss has not fallen to round-off (``control_level > 1e-8 * noisy_level``, both
       medians at the largest n): the slope is made by the protocol, not by the noise;
    3. ``floor``: the loss has a positive floor on exact representations of ``f*``
       (``loss_floor > 1e-10``, :data:`FLOOR_TOLERANCE`: a floor of ``2e-16`` is round-off of an
       exact zero) and the control stays above round-off: the estimator really lands
       on a positive-loss exact representation;
    4. ``set-valued``: the near-optimal starts disagree (``spread_ratio > 0.5``), or the CI of the
       worst near-optimal loss contains 0 while the estimate's does not;
    5. ``no-decay``: the CI of the slope reaches 0 or above (or is not finite): the data do not
       show the loss falling, whatever the other checks say;
    6. ``rate``: none of the above.

    Parameters
    ----------
    checked : bool
        A noise-free control was run and there were at least two starts.
    slope, ci
        The estimate's slope and its CI.
    control_ci : (float, float)
        CI of the noise-free control's slope.
    control_level, noisy_level : float
        Median control loss and median noisy loss at the largest n.
    loss_floor : float
        :func:`hmoe_sim.identifiability.loss_floor` of the loss on the model class.
    spread_ratio : float
        Median over fits of ``(max - min) / best`` over the near-optimal starts.
    worst_ci : (float, float)
        CI of the slope of the largest near-optimal loss.
    """
    if not checked or not np.isfinite(slope):
        return "unchecked"
    above_round_off = bool(np.isfinite(control_level) and control_level > ROUND_OFF_FRACTION * noisy_level)
    if above_round_off and _inside(slope, *control_ci):
        return "noise-free-artefact"
    if above_round_off and np.isfinite(loss_floor) and loss_floor > FLOOR_TOLERANCE:
        return "floor"
    best_excludes_zero = not _inside(0.0, *ci) and all(np.isfinite(ci))
    if (np.isfinite(spread_ratio) and spread_ratio > SPREAD_LIMIT) or (best_excludes_zero and _inside(0.0, *worst_ci)):
        return "set-valued"
    if not (all(np.isfinite(ci)) and ci[1] < 0.0):
        return "no-decay"
    return "rate"
