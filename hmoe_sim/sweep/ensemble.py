"""Truth ensembles: per-truth rates and what they say together (shared vs non-shared, paired).

A truth-ensemble sweep (``[truth] seeds = [1, ..., T]``) fits every series on every truth,
with the same data sets and starts for both structures of a truth (a paired design). The
tables here summarise it without choosing truths after looking:

* :func:`per_truth_table` -- one row per (truth, H, series, loss): slope, CI, verdict,
  worst-case slope, control slope and control level;
* :func:`ensemble_table` -- per (H, loss): how many truths got each pair of verdicts
  (shared, non-shared), the median and a bootstrap CI over truths of the paired slope
  difference (shared minus non-shared, over the truths where both verdicts are ``rate``), the
  number of truths on which the shared CI lies entirely below the non-shared CI, and the
  paired ratio of the noise-free control levels (non-shared over shared).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hmoe_sim.models.hmoe import HMoE
from hmoe_sim.sweep.config import SweepConfig
from hmoe_sim.sweep.setup import series_setup

__all__ = ["PER_TRUTH_COLUMNS", "series_heads", "per_truth_table", "ensemble_table", "structure_pairs"]

PER_TRUTH_COLUMNS = ["truth", "H", "series", "structure", "loss", "slope", "ci_low", "ci_high", "verdict",
                     "slope_worst", "ci_low_worst", "ci_high_worst", "spread_ratio", "control_slope",
                     "control_ci_low", "control_ci_high", "control_level", "noisy_level", "loss_floor", "n_used"]


def series_heads(config: SweepConfig) -> dict[str, int]:
    """Number of heads ``H`` of each HMoE series (series of other models are left out)."""
    out = {}
    for s in config.series:
        model = series_setup(config, s, s["truth_seeds"][0]).fit_model
        if isinstance(model, HMoE):
            out[s["name"]] = int(model.n_heads)
    return out


def structure_pairs(config: SweepConfig) -> dict[int, tuple[str, str]]:
    """Per ``H``: the (shared, non-shared) series pair; ``H`` with another mix of series is left out."""
    heads = series_heads(config)
    structure = {s["name"]: s.get("structure") for s in config.series}
    pairs = {}
    for h in sorted(set(heads.values())):
        names = [n for n, v in heads.items() if v == h]
        shared = [n for n in names if structure[n] == "shared"]
        nonshared = [n for n in names if structure[n] == "nonshared"]
        if len(shared) == 1 and len(nonshared) == 1:
            pairs[h] = (shared[0], nonshared[0])
    return pairs


def per_truth_table(rates: pd.DataFrame, config: SweepConfig) -> pd.DataFrame:
    """``rates.csv`` of an ensemble reduced to :data:`PER_TRUTH_COLUMNS` (one row per truth, H, series, loss)."""
    heads = series_heads(config)
    structure = {s["name"]: s.get("structure") or "" for s in config.series}
    table = rates[rates["series"].isin(heads)].copy()
    table["H"] = table["series"].map(heads).astype(int)
    table["structure"] = table["series"].map(structure)
    return table[PER_TRUTH_COLUMNS].sort_values(["H", "loss", "series", "truth"], kind="stable").reset_index(drop=True)


def _bootstrap_median(values: np.ndarray, n_boot: int, level: float, seed: int) -> tuple[float, float, float]:
    if len(values) == 0:
        return np.nan, np.nan, np.nan
    rng = np.random.default_rng(seed)
    draws = np.median(values[rng.integers(0, len(values), size=(n_boot, len(values)))], axis=1)
    alpha = (1 - level) / 2
    return float(np.median(values)), float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def ensemble_table(per_truth: pd.DataFrame, config: SweepConfig, *, n_boot: int = 2000, level: float = 0.95,
                   seed: int = 0) -> pd.DataFrame:
    """Per (H, loss): the ensemble of truths summarised, shared against non-shared (paired by truth).

    Columns: ``H, loss, shared, nonshared, n_truths`` (truths with both series), ``verdict_pairs``
    (``"shared_verdict/nonshared_verdict: count"`` joined by ``"; "``), ``n_both_rate``,
    ``diff_median, diff_ci_low, diff_ci_high`` (median over truths of slope(shared) -
    slope(non-shared), with a percentile-bootstrap CI over truths, over the truths where both
    verdicts are ``rate``), ``n_shared_ci_below`` (truths on which the shared CI lies entirely
    below the non-shared CI), ``control_ratio_median, control_ratio_min, control_ratio_max``
    (over truths of the non-shared control level divided by the shared one).
    """
    rows = []
    for h, (shared, nonshared) in structure_pairs(config).items():
        for loss in dict.fromkeys(per_truth["loss"]):
            part = per_truth[(per_truth["H"] == h) & (per_truth["loss"] == loss)]
            a = part[part["series"] == shared].set_index("truth")
            b = part[part["series"] == nonshared].set_index("truth")
            truths = a.index.intersection(b.index)
            a, b = a.loc[truths], b.loc[truths]
            pairs = (a["verdict"] + "/" + b["verdict"]).value_counts()
            both = (a["verdict"] == "rate") & (b["verdict"] == "rate")
            diff = (a.loc[both, "slope"] - b.loc[both, "slope"]).to_numpy(dtype=float)
            med, lo, hi = _bootstrap_median(diff, n_boot, level, seed)
            ratio = (b["control_level"] / a["control_level"]).to_numpy(dtype=float)
            ratio = ratio[np.isfinite(ratio)]
            rows.append({
                "H": h, "loss": loss, "shared": shared, "nonshared": nonshared, "n_truths": len(truths),
                "verdict_pairs": "; ".join(f"{k}: {int(v)}" for k, v in sorted(pairs.items())),
                "n_both_rate": int(both.sum()), "diff_median": med, "diff_ci_low": lo, "diff_ci_high": hi,
                "n_shared_ci_below": int((a["ci_high"] < b["ci_low"]).sum()),
                "control_ratio_median": float(np.median(ratio)) if len(ratio) else np.nan,
                "control_ratio_min": float(ratio.min()) if len(ratio) else np.nan,
                "control_ratio_max": float(ratio.max()) if len(ratio) else np.nan,
            })
    return pd.DataFrame(rows)
