"""Truth ensembles: per-truth rates and what they say together (shared vs non-shared, paired).

A truth-ensemble sweep (``[truth] seeds = [1, ..., T]``) fits every series on every truth,
with the same data sets and starts for both structures of a truth (a paired design). The
tables here summarise it without choosing truths after looking:

* :func:`per_truth_table` -- one row per (truth, H, series, loss): slope, CI, verdict,
  worst-case slope, control slope and control level;
* :func:`ensemble_table` -- per (H, loss): how many truths got each pair of verdicts
  (shared, non-shared), the median and a bootstrap CI over truths of the paired slope
  difference (shared minus non-shared, over the truths where both verdicts are ``rate``), the
  number of truths on which the shared CI lies entirely below the non-shared CI; and, from the
  per-fit results, the comparisons that read the noisy data directly:
  :func:`paired_largest_n` (shared minus non-shared log loss at the largest n, paired by
  replication, per truth and over truths, with a sign count) and :func:`ensemble_slope` (one
  slope per structure over all truths, one intercept per truth).
"""

from __future__ import annotations

from itertools import product

import numpy as np
import pandas as pd

from hmoe_sim.equivalence import upper_range
from hmoe_sim.models.hmoe import HMoE
from hmoe_sim.sweep.axes import AXIS_COLUMN, axis_values, fixed_noise
from hmoe_sim.sweep.config import SweepConfig
from hmoe_sim.sweep.setup import series_setup

__all__ = ["PER_TRUTH_COLUMNS", "series_heads", "per_truth_table", "ensemble_table", "structure_pairs",
           "paired_largest_n", "ensemble_slope"]

PER_TRUTH_COLUMNS = ["truth", "H", "series", "structure", "loss", "slope", "ci_low", "ci_high", "verdict",
                     "evidence", "identifiable", "slope_worst", "ci_low_worst", "ci_high_worst", "spread_ratio",
                     "control_slope", "control_ci_low", "control_ci_high", "control_level", "noisy_level",
                     "loss_floor", "n_used"]
#: columns of ``rates.csv`` that ``per_truth.csv`` carries after :data:`PER_TRUTH_COLUMNS`
PER_TRUTH_EXTRA = ["axis", "n_min", "n_max", "slope_upper", "ci_low_upper", "ci_high_upper", "equivalence_n_eff",
                   "equivalence_diff", "equivalence_ci_low", "equivalence_ci_high", "n_matched_upper"]


def series_heads(config: SweepConfig) -> dict[str, int]:
    """Number of heads ``H`` of each HMoE series (series of other models are left out)."""
    out = {}
    for s in config.series:
        model = series_setup(config, s, s.truth_seeds[0]).fit_model
        if isinstance(model, HMoE):
            out[s.name] = int(model.n_heads)
    return out


def structure_pairs(config: SweepConfig) -> dict[int, tuple[str, str]]:
    """Per ``H``: the (shared, non-shared) series pair; ``H`` with another mix of series is left out."""
    heads = series_heads(config)
    structure = {s.name: s.structure for s in config.series}
    pairs = {}
    for h in sorted(set(heads.values())):
        names = [n for n, v in heads.items() if v == h]
        shared = [n for n in names if structure[n] == "shared"]
        nonshared = [n for n in names if structure[n] == "nonshared"]
        if len(shared) == 1 and len(nonshared) == 1:
            pairs[h] = (shared[0], nonshared[0])
    return pairs


def per_truth_table(rates: pd.DataFrame, config: SweepConfig, results: pd.DataFrame | None = None) -> pd.DataFrame:
    """``rates.csv`` of an ensemble reduced to :data:`PER_TRUTH_COLUMNS` and :data:`PER_TRUTH_EXTRA`
    (one row per truth, H, series, loss, axis).

    With ``results`` (the per-fit table) every row also gets ``paired_diff, paired_diff_ci_low,
    paired_diff_ci_high`` (:func:`paired_largest_n`: log loss of the shared minus the non-shared
    series of its ``H`` at the largest value of the row's axis, paired by data set; the same on
    both rows of a pair).
    """
    heads = series_heads(config)
    structure = {s.name: s.structure or "" for s in config.series}
    table = rates[rates["series"].isin(heads)].copy()
    table["H"] = table["series"].map(heads).astype(int)
    table["structure"] = table["series"].map(structure)
    columns = PER_TRUTH_COLUMNS + PER_TRUTH_EXTRA
    if results is not None:
        for name in ("paired_diff", "paired_diff_ci_low", "paired_diff_ci_high"):
            table[name] = np.nan
        for shared, nonshared in structure_pairs(config).values():
            for loss, axis in table[["loss", "axis"]].drop_duplicates().itertuples(index=False):
                diffs, _ = paired_largest_n(results, shared, nonshared, loss, axis=axis)
                for d in diffs.itertuples():
                    rows = table["series"].isin([shared, nonshared]) & (table["loss"] == loss) & \
                        (table["truth"] == d.truth) & (table["axis"] == axis)
                    table.loc[rows, ["paired_diff", "paired_diff_ci_low", "paired_diff_ci_high"]] = \
                        [d.diff, d.diff_ci_low, d.diff_ci_high]
        columns += ["paired_diff", "paired_diff_ci_low", "paired_diff_ci_high"]
    return table[columns].sort_values(["axis", "H", "loss", "series", "truth"],
                                      kind="stable").reset_index(drop=True)


def _bootstrap_median(values: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[float, float, float]:
    if len(values) == 0:
        return np.nan, np.nan, np.nan
    rng = np.random.default_rng(seed)
    draws = np.median(values[rng.integers(0, len(values), size=(n_boot, len(values)))], axis=1)
    alpha = (1 - level) / 2
    return float(np.median(values)), float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def ensemble_table(per_truth: pd.DataFrame, config: SweepConfig, results: pd.DataFrame | None = None, *,
                   n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Per (axis, H, loss): the ensemble of truths summarised, shared against non-shared (paired by truth).

    Columns: ``axis`` (``"n"``, or ``"n_eff"`` for a run with a noise ladder: every comparison below
    made on that axis), ``H, loss, shared, nonshared, n_truths`` (truths with both series), ``verdict_pairs``
    (``"shared_verdict/nonshared_verdict: count"`` joined by ``"; "``), ``n_both_rate``,
    ``diff_median, diff_ci_low, diff_ci_high`` (median over truths of slope(shared) -
    slope(non-shared), with a percentile-bootstrap CI over truths, over the truths where both
    verdicts are ``rate``), ``n_shared_ci_below`` (truths on which the shared CI lies entirely
    below the non-shared CI), ``n_shared_upper_ci_below`` (the same for the upper-half slopes),
    ``n_shared_rate`` and ``n_nonshared_rate`` (truths whose verdict is
    ``rate``), ``n_both_decay, decay_diff_median, decay_diff_ci_low, decay_diff_ci_high`` (the
    paired slope difference over the truths where both slopes' CIs lie below 0, whatever the
    verdicts). With ``results`` (the per-fit table) also ``largest_n, largest_n_diff_median,
    largest_n_diff_ci_low, largest_n_diff_ci_high, n_shared_below`` (:func:`paired_largest_n`)
    and per structure ``{shared,nonshared}_ensemble_slope, _ci_low, _ci_high``
    (:func:`ensemble_slope`) and the same over the upper half of each truth's axis
    (``{shared,nonshared}_ensemble_slope_upper, _ci_low_upper, _ci_high_upper``). The ratio of the
    noise-free control levels is not reported: a control that stops on a flat direction sits at a
    level set by its start (``rates.csv``, ``control_perturb_exponent``), so the ratio measures the
    protocol, not the data.
    """
    rows = []
    axes = list(dict.fromkeys(per_truth["axis"])) if "axis" in per_truth else ["n"]
    for axis, (h, (shared, nonshared)) in product(axes, structure_pairs(config).items()):
        for loss in dict.fromkeys(per_truth["loss"]):
            part = per_truth[(per_truth["H"] == h) & (per_truth["loss"] == loss)]
            if "axis" in part:
                part = part[part["axis"] == axis]
            a = part[part["series"] == shared].set_index("truth")
            b = part[part["series"] == nonshared].set_index("truth")
            truths = a.index.intersection(b.index)
            a, b = a.loc[truths], b.loc[truths]
            pairs = (a["verdict"] + "/" + b["verdict"]).value_counts()
            both = (a["verdict"] == "rate") & (b["verdict"] == "rate")
            diff = (a.loc[both, "slope"] - b.loc[both, "slope"]).to_numpy(dtype=float)
            med, lo, hi = _bootstrap_median(diff, n_boot, level, seed)
            decay = (a["ci_high"] < 0) & (b["ci_high"] < 0)
            dmed, dlo, dhi = _bootstrap_median((a.loc[decay, "slope"] - b.loc[decay, "slope"]).to_numpy(dtype=float),
                                               n_boot, level, seed)
            row = {
                "axis": axis, "H": h, "loss": loss, "shared": shared, "nonshared": nonshared, "n_truths": len(truths),
                "verdict_pairs": "; ".join(f"{k}: {int(v)}" for k, v in sorted(pairs.items())),
                "n_both_rate": int(both.sum()), "diff_median": med, "diff_ci_low": lo, "diff_ci_high": hi,
                "n_shared_ci_below": int((a["ci_high"] < b["ci_low"]).sum()),
                "n_shared_upper_ci_below": int((a["ci_high_upper"] < b["ci_low_upper"]).sum())
                if "ci_high_upper" in a else 0,
                "n_shared_rate": int((a["verdict"] == "rate").sum()),
                "n_nonshared_rate": int((b["verdict"] == "rate").sum()),
                "n_both_decay": int(decay.sum()), "decay_diff_median": dmed, "decay_diff_ci_low": dlo,
                "decay_diff_ci_high": dhi,
            }
            if results is not None:
                _, paired = paired_largest_n(results, shared, nonshared, loss, n_boot=n_boot, level=level, seed=seed,
                                             axis=axis)
                row.update({"largest_n": paired["n_max"], "largest_n_diff_median": paired["median"],
                            "largest_n_diff_ci_low": paired["ci_low"], "largest_n_diff_ci_high": paired["ci_high"],
                            "n_shared_below": paired["n_shared_below"]})
                for kind, name in (("shared", shared), ("nonshared", nonshared)):
                    fit = ensemble_slope(results, name, loss, n_boot=n_boot, level=level, seed=seed, axis=axis)
                    row.update({f"{kind}_ensemble_slope": fit["slope"], f"{kind}_ensemble_ci_low": fit["ci_low"],
                                f"{kind}_ensemble_ci_high": fit["ci_high"]})
                for kind, name in (("shared", shared), ("nonshared", nonshared)):
                    fit = ensemble_slope(results, name, loss, n_boot=n_boot, level=level, seed=seed, axis=axis,
                                         upper=True)
                    row.update({f"{kind}_ensemble_slope_upper": fit["slope"],
                                f"{kind}_ensemble_ci_low_upper": fit["ci_low"],
                                f"{kind}_ensemble_ci_high_upper": fit["ci_high"]})
            rows.append(row)
    return pd.DataFrame(rows)


def _noisy_losses(results: pd.DataFrame, series: str, loss: str, axis: str = "n") -> pd.DataFrame:
    """Noisy fits of one series with a finite positive loss: ``truth, n, sigma, replication, x, upper, log``.

    ``x`` is the value of ``axis`` (on ``"n"`` with a noise ladder, the fits at its largest sigma:
    :func:`hmoe_sim.sweep.axes.fixed_noise`); ``sigma`` the noise level (0 when not recorded);
    ``upper`` whether ``x`` lies in the upper half of the truth's axis values
    (:func:`hmoe_sim.equivalence.upper_range` of every noisy fit of the truth, usable or not).
    """
    part = results[(results["series"] == series) & (results["control"].fillna("").astype(str) == "")]
    part = axis_values(fixed_noise(part) if axis == "n" else part, axis)
    upper = np.zeros(len(part), dtype=bool)
    truths = part["truth"].to_numpy()
    x_all = part[AXIS_COLUMN].to_numpy(dtype=float)
    for truth in np.unique(truths):
        mine = truths == truth
        upper[mine] = np.isin(x_all[mine], upper_range(x_all[mine]))
    values = part[loss].to_numpy(dtype=float)
    keep = np.isfinite(values) & (values > 0)
    out = part.loc[keep, ["truth", "n", "replication"]].copy()
    out["sigma"] = part.loc[keep, "noise_std"].to_numpy(dtype=float) if "noise_std" in part else 0.0
    out["x"] = x_all[keep]
    out["upper"] = upper[keep]
    out["log"] = np.log(values[keep])
    return out


def paired_largest_n(results: pd.DataFrame, shared: str, nonshared: str, loss: str, *, n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0, axis: str = "n") -> tuple[pd.DataFrame, dict[str, float]]:
    """Shared minus non-shared log loss at the largest n (or n_eff, ``axis="n_eff"``), paired by data set.

    Both structures are fitted to the same data sets (replication ``r`` of truth ``t`` at size
    ``n`` and noise level sigma), so the difference is taken per data set. Per truth: the mean difference over the
    replications fitted by both, with a percentile-bootstrap CI over replications. Over truths:
    the median of the per-truth means with a bootstrap CI over truths, and the number of truths
    whose mean is negative (shared below non-shared).

    Returns
    -------
    (pandas.DataFrame, dict)
        Per truth ``truth, n, n_pairs, diff, diff_ci_low, diff_ci_high`` (``n``: the largest value of
        the axis, an n_eff on ``"n_eff"``); and the ensemble ``n_max, n_truths, n_shared_below, median,
        ci_low, ci_high``.
    """
    a, b = _noisy_losses(results, shared, loss, axis), _noisy_losses(results, nonshared, loss, axis)
    rng = np.random.default_rng(seed)
    alpha = (1 - level) / 2
    rows = []
    for truth in sorted(set(a["truth"]) & set(b["truth"])):
        at, bt = a[a["truth"] == truth], b[b["truth"] == truth]
        n_max = min(at["x"].max(), bt["x"].max())
        pair = at[at["x"] == n_max].merge(bt[bt["x"] == n_max], on=["truth", "n", "sigma", "replication"])
        diff = (pair["log_x"] - pair["log_y"]).to_numpy()
        if len(diff) == 0:
            continue
        boot = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(1)
        rows.append({"truth": int(truth), "n": int(n_max) if axis == "n" else float(n_max), "n_pairs": len(diff),
                     "diff": float(diff.mean()),
                     "diff_ci_low": float(np.quantile(boot, alpha)),
                     "diff_ci_high": float(np.quantile(boot, 1 - alpha))})
    per_truth = pd.DataFrame(rows, columns=["truth", "n", "n_pairs", "diff", "diff_ci_low", "diff_ci_high"])
    med, lo, hi = _bootstrap_median(per_truth["diff"].to_numpy(dtype=float), n_boot, level, seed)
    summary = {"n_max": float(per_truth["n"].max()) if len(per_truth) else np.nan, "n_truths": len(per_truth),
               "n_shared_below": int((per_truth["diff"] < 0).sum()), "median": med, "ci_low": lo, "ci_high": hi}
    return per_truth, summary


def ensemble_slope(results: pd.DataFrame, series: str, loss: str, *, n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0, axis: str = "n", upper: bool = False) -> dict[str, float]:
    """One slope of log loss on log n (or log n_eff, ``axis="n_eff"``) over every truth of a series,
    one intercept per truth.

    The OLS slope after centring the log axis and ``log loss`` within each truth. The CI is a
    percentile bootstrap that resamples the replications within each (truth, n, sigma) cell,
    keeping the design, as :func:`hmoe_sim.rates.fit_rate` does for one truth. With ``upper``
    only the fits in the upper half of each truth's axis values (:func:`hmoe_sim.equivalence.upper_range`).

    Returns
    -------
    dict
        ``slope, ci_low, ci_high, n_truths, n_fits``.
    """
    data = _noisy_losses(results, series, loss, axis)
    if upper:
        data = data[data["upper"]]
    data = data.sort_values(["truth", "x", "n", "replication"], kind="stable")
    if data.empty or data.groupby("truth")["x"].nunique().max() < 2:
        return {"slope": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n_truths": 0, "n_fits": len(data)}
    x = np.log(data["x"].to_numpy(dtype=float))
    y = data["log"].to_numpy()
    truth = data["truth"].to_numpy()
    x_c = x - pd.Series(x).groupby(truth).transform("mean").to_numpy()
    sxx = float(np.sum(x_c**2))

    def slope_of(values: np.ndarray) -> np.ndarray:
        centred = values - pd.DataFrame(values.T).groupby(truth).transform("mean").to_numpy().T
        return (centred * x_c).sum(-1) / sxx

    cells = data.groupby(["truth", "n", "sigma"]).indices
    rng = np.random.default_rng(seed)
    idx = np.empty((n_boot, len(data)), dtype=np.int64)
    for rows in cells.values():
        rows = np.sort(rows)
        idx[:, rows] = rows[rng.integers(0, len(rows), size=(n_boot, len(rows)))]
    boot = slope_of(y[idx])
    alpha = (1 - level) / 2
    return {"slope": float(slope_of(y[None, :])[0]), "ci_low": float(np.quantile(boot, alpha)),
            "ci_high": float(np.quantile(boot, 1 - alpha)), "n_truths": int(len(set(truth))), "n_fits": len(data)}
