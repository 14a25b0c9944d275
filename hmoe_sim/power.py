"""Power of a convergence-rate design, before it runs (pure math, no I/O).

A design is a set of sample sizes, a number of replications per size and, for an ensemble, a
number of truths. With per-fit losses whose logarithm scatters with standard deviation ``sd``
around ``c + slope log n`` (the spread measured on a committed run), the OLS slope of
:func:`hmoe_sim.rates.fit_rate` has standard error ``sd / sqrt(R sum_i (x_i - xbar)^2)``,
``x_i = log n_i``. From it:

* :func:`slope_halfwidth` -- the expected half-width of a slope's CI (normal approximation of
  the bootstrap interval);
* :func:`difference_halfwidth` -- the same for the paired difference of mean log losses of two
  structures at one size;
* :func:`slope_power` -- the probability that the CI excludes 0 when the true slope is ``slope``
  (the power to tell a rate ``slope`` from no decay);
* :func:`design_table` -- these numbers for several designs side by side.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

from hmoe_sim._validation import check_positive_float, check_positive_int

__all__ = ["slope_standard_error", "slope_halfwidth", "difference_halfwidth", "slope_power", "design_table"]


def _sizes(sizes: Sequence[float]) -> np.ndarray:
    n = np.asarray(sizes, dtype=np.float64)
    if n.ndim != 1 or np.unique(n).size < 2 or np.any(~np.isfinite(n)) or np.any(n <= 1):
        raise ValueError(f"sizes must be at least two distinct finite values > 1, got {list(sizes)!r}")
    return n


def _z(level: float) -> float:
    level = check_positive_float("level", level)
    if not level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return float(norm.ppf((1 + level) / 2))


def slope_standard_error(sizes: Sequence[float], replications: int, sd: float, truths: int = 1) -> float:
    """Standard error of the OLS slope of ``log loss`` on ``log n``.

    Parameters
    ----------
    sizes : sequence of float
        The distinct sample sizes of the design.
    replications : int
        Fits per size (and per truth).
    sd : float
        Standard deviation of ``log loss`` within one (truth, size) cell.
    truths : int, default 1
        Truths pooled with one common slope and one intercept per truth (the within-truth
        design is the same, so the information adds up).
    """
    x = np.log(_sizes(sizes))
    replications = check_positive_int("replications", replications)
    truths = check_positive_int("truths", truths)
    sd = check_positive_float("sd", sd)
    return float(sd / np.sqrt(truths * replications * np.sum((x - x.mean()) ** 2)))


def slope_halfwidth(sizes: Sequence[float], replications: int, sd: float, *, truths: int = 1,
                    level: float = 0.95) -> float:
    """Expected half-width of the slope's CI at ``level`` (normal approximation)."""
    return _z(level) * slope_standard_error(sizes, replications, sd, truths)


def difference_halfwidth(replications: int, sd_a: float, sd_b: float, *, level: float = 0.95) -> float:
    """Expected half-width of the CI of ``mean log loss_a - mean log loss_b`` at one size.

    The two structures are fitted to the same data sets (paired); their correlation is not
    assumed, so the half-width is the conservative one of independent means.
    """
    replications = check_positive_int("replications", replications)
    sd_a, sd_b = check_positive_float("sd_a", sd_a), check_positive_float("sd_b", sd_b)
    return _z(level) * float(np.sqrt((sd_a**2 + sd_b**2) / replications))


def slope_power(slope: float, sizes: Sequence[float], replications: int, sd: float, *, truths: int = 1,
                level: float = 0.95) -> float:
    """Probability that the slope's CI excludes 0 when the true slope is ``slope`` (two-sided)."""
    se = slope_standard_error(sizes, replications, sd, truths)
    z = _z(level)
    shift = abs(float(slope)) / se
    return float(norm.cdf(shift - z) + norm.cdf(-shift - z))


def design_table(designs: dict[str, tuple[Sequence[float], int]], sd: dict[str, float], *, truths: int = 1,
                 slope: float = -0.5, level: float = 0.95) -> pd.DataFrame:
    """Half-widths and power of several designs for several spreads.

    Parameters
    ----------
    designs : dict
        ``name -> (sizes, replications)``.
    sd : dict
        ``label -> sd of log loss`` (e.g. per structure and H).
    truths : int
        Truths pooled in the ensemble slope.
    slope : float
        The rate to be told from 0.

    Returns
    -------
    pandas.DataFrame
        One row per (design, sd label): ``design, sd_label, sd, n_sizes, decades, replications,
        slope_halfwidth, power_per_truth`` (one truth), ``ensemble_halfwidth,
        power_ensemble`` (``truths`` pooled).
    """
    rows = []
    for name, (sizes, reps) in designs.items():
        n = _sizes(sizes)
        for label, s in sd.items():
            rows.append({
                "design": name, "sd_label": label, "sd": float(s), "n_sizes": int(n.size),
                "decades": float(np.log10(n.max() / n.min())), "replications": int(reps),
                "slope_halfwidth": slope_halfwidth(n, reps, s, level=level),
                "power_per_truth": slope_power(slope, n, reps, s, level=level),
                "ensemble_halfwidth": slope_halfwidth(n, reps, s, truths=truths, level=level),
                "power_ensemble": slope_power(slope, n, reps, s, truths=truths, level=level),
            })
    return pd.DataFrame(rows)
