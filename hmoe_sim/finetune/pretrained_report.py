"""Paired differences with bootstrap intervals for the pretrained-model experiment (issue 21).

Pure functions of the table of :mod:`hmoe_sim.finetune.pretrained_experiment` (one row per fit):
for each teacher and training size, the per-seed difference of a metric between a reference
student and each other student (the same seed shares the training pool, target noise and
initialisation seed, so the difference is paired), its mean over seeds and a percentile
bootstrap interval over seeds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from hmoe_sim._validation import check_positive_int

__all__ = ["OPTIMISER_COLUMNS", "PAIRED_COLUMNS", "bootstrap_mean_ci", "paired_differences", "summary_table",
           "with_optimiser_columns"]

#: the columns of :func:`paired_differences`' table
PAIRED_COLUMNS = ("teacher", "n", "comparison", "n_seeds", "reference_mean", "other_mean", "mean_diff", "ci_low",
                  "ci_high", "relative_diff", "frac_reference_lower")


#: the optimiser-check columns :func:`with_optimiser_columns` adds: (start, stage, metric) of each
OPTIMISER_COLUMNS = {"check_seeds": ("default", "adam", "n_seeds"),
                     "check_adam_test_mse": ("default", "adam", "test_mse"),
                     "polish_train_mse": ("default", "polish", "train_mse"),
                     "polish_test_mse": ("default", "polish", "test_mse"),
                     "polish_certified": ("default", "polish", "certified"),
                     "oracle_train_mse": ("oracle", "adam", "train_mse"),
                     "oracle_test_mse": ("oracle", "adam", "test_mse"),
                     "oracle_polish_train_mse": ("oracle", "polish", "train_mse"),
                     "oracle_polish_test_mse": ("oracle", "polish", "test_mse")}


def bootstrap_mean_ci(values: Sequence[float] | np.ndarray, *, n_boot: int = 10_000, level: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``.

    ``n_boot`` resamples of ``len(values)`` values with replacement; the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the resampled means (the inverse
    of the empirical distribution function, no interpolation).

    Raises
    ------
    ValueError
        For an empty or non-finite ``values`` or a ``level`` outside (0, 1).
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"values must be a non-empty 1-d array of finite numbers, got {values!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(check_positive_int("n_boot", n_boot), x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(low), float(high)


def paired_differences(table: pd.DataFrame, *, metric: str = "test_mse", reference: str = "hora",
                       others: Sequence[str] | None = None, n_boot: int = 10_000, level: float = 0.95,
                       seed: int = 0) -> pd.DataFrame:
    """Per teacher and ``n``: ``reference - other`` of ``metric``, paired by seed, with bootstrap CIs.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per fit with columns ``teacher, adapter, n, seed`` and ``metric``.
    metric : str
        The compared column (lower is better for an MSE: a negative difference favours ``reference``).
    reference : str
        Adapter kind subtracted from (``"hora"``).
    others : sequence of str, optional
        Adapter kinds compared with it (default: every other kind in ``table``).
    n_boot, level, seed
        Of :func:`bootstrap_mean_ci` (the same ``seed`` for every cell).

    Returns
    -------
    pandas.DataFrame
        Columns ``teacher, n, comparison, n_seeds, reference_mean, other_mean, mean_diff, ci_low,
        ci_high, relative_diff, frac_reference_lower``: seeds where both fits exist only;
        ``relative_diff`` is ``mean_diff / other_mean``. Cells with no paired seed are left out.
    """
    needed = {"teacher", "adapter", "n", "seed", metric}
    if needed - set(table.columns):
        raise ValueError(f"table lacks the columns {sorted(needed - set(table.columns))}")
    kinds = list(dict.fromkeys(table["adapter"]))
    if reference not in kinds:
        raise ValueError(f"reference {reference!r} is not an adapter of the table ({kinds})")
    others = [k for k in kinds if k != reference] if others is None else list(others)
    wide = table.pivot_table(index=["teacher", "n", "seed"], columns="adapter", values=metric, aggfunc="first")
    rows = []
    for (teacher, n), cell in wide.groupby(level=["teacher", "n"], sort=False):
        for other in others:
            if other not in cell:
                continue
            pair = cell[[reference, other]].dropna()
            if pair.empty:
                continue
            diff = (pair[reference] - pair[other]).to_numpy()
            low, high = bootstrap_mean_ci(diff, n_boot=n_boot, level=level, seed=seed)
            other_mean = float(pair[other].mean())
            rows.append({"teacher": teacher, "n": int(n), "comparison": f"{reference} - {other}",
                         "n_seeds": len(pair), "reference_mean": float(pair[reference].mean()),
                         "other_mean": other_mean, "mean_diff": float(diff.mean()), "ci_low": low,
                         "ci_high": high, "relative_diff": float(diff.mean()) / other_mean,
                         "frac_reference_lower": float((diff < 0).mean())})
    out = pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))
    order = {t: i for i, t in enumerate(dict.fromkeys(table["teacher"]))}  # teachers in the table's order
    return out.sort_values(["teacher", "n", "comparison"], key=lambda c: c.map(order) if c.name == "teacher" else c,
                           kind="stable", ignore_index=True)


def summary_table(table: pd.DataFrame, *, n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per teacher, student and ``n``: mean test MSE with its bootstrap CI over seeds, mean training
    and validation MSE, the fraction of converged fits and the median iteration count."""
    rows = []
    for (teacher, label, n), cell in table.groupby(["teacher", "label", "n"], sort=False):
        low, high = bootstrap_mean_ci(cell["test_mse"].to_numpy(), n_boot=n_boot, level=level, seed=seed)
        rows.append({"teacher": teacher, "adapter": cell["adapter"].iloc[0], "label": label,
                     "n_params": int(cell["n_params"].iloc[0]), "n": int(n), "n_seeds": len(cell),
                     "test_mse": float(cell["test_mse"].mean()), "test_mse_ci_low": low, "test_mse_ci_high": high,
                     "base_test_mse": float(cell["base_test_mse"].iloc[0]),
                     "train_mse": float(cell["train_mse"].mean()), "val_mse": float(cell["val_mse"].mean()),
                     "converged": float(cell["converged"].astype(bool).mean()),
                     "median_iterations": float(cell["iterations"].median())})
    return pd.DataFrame(rows)


def with_optimiser_columns(summary: pd.DataFrame, check: pd.DataFrame) -> pd.DataFrame:
    """``summary`` with the optimiser-check columns of :data:`OPTIMISER_COLUMNS` (NaN where a cell was not checked).

    ``check`` is :func:`hmoe_sim.finetune.optimiser_check.check_summary`'s table: one row per teacher,
    adapter, n, start and stage. ``check_adam_test_mse`` is the rerun of the table's own fits on the
    checked seeds (so the polish and oracle columns compare with it seed for seed);
    ``check_seeds`` how many seeds were checked.
    """
    out = summary.copy()
    keyed = check.set_index(["teacher", "adapter", "n", "start", "stage"])
    for column, (start, stage, metric) in OPTIMISER_COLUMNS.items():
        out[column] = [keyed[metric].get((t, a, n, start, stage), float("nan"))
                       for t, a, n in out[["teacher", "adapter", "n"]].itertuples(index=False)]
    return out
