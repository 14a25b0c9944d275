"""Tables from a sweep's per-fit results: rates per (series, loss) and per-size summaries.

A fit is *flagged* when the estimator reports it diverged or ended on the boundary of the
parameter box. Flagged fits, and fits whose loss is not a finite positive number, are
counted in every table and never enter a mean or a slope.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hmoe_sim.rates import fit_rate
from hmoe_sim.sweep.config import SweepConfig

__all__ = ["loss_columns", "flagged", "usable", "rates_table", "summary_table", "format_rates", "RATE_COLUMNS"]

#: leading columns of ``rates.csv``
RATE_COLUMNS = ["series", "loss", "slope", "ci_low", "ci_high", "n_min", "n_max"]


def loss_columns(config: SweepConfig) -> list[str]:
    """The loss columns a sweep records (``D1``, ``D2``, ``L2`` as configured)."""
    spec = config.data["losses"]
    return list(spec["kinds"]) + (["L2"] if spec["l2"] else [])


def flagged(results: pd.DataFrame) -> pd.Series:
    """Per fit: diverged or on the boundary of the parameter box."""
    out = pd.Series(False, index=results.index)
    for col in ("diverged", "on_boundary"):
        if col in results:
            out |= results[col].astype(bool)
    return out


def usable(results: pd.DataFrame, loss: str) -> pd.Series:
    """Per fit: not flagged, and the loss is finite and positive (it enters means and slopes)."""
    values = results[loss].to_numpy(dtype=float)
    return ~flagged(results) & pd.Series(np.isfinite(values) & (values > 0), index=results.index)


def rates_table(results: pd.DataFrame, config: SweepConfig, *, n_boot: int = 2000, level: float = 0.95
                ) -> pd.DataFrame:
    """One row per (series, loss): the fitted log-log slope with its bootstrap CI.

    Columns: ``series, loss, slope, ci_low, ci_high, n_min, n_max`` then the rest of
    :meth:`hmoe_sim.rates.RateFit.as_dict` (power-law vs log-model comparison), then
    ``n_fits`` (rows of the series), ``n_used``, ``n_flagged`` (diverged or on boundary) and
    ``n_bad_loss`` (unflagged fits whose loss is not finite and positive).
    """
    rows = []
    bad = flagged(results)
    for s in config.series:
        part = results[results["series"] == s["name"]]
        for loss in loss_columns(config):
            ok = usable(part, loss)
            counts = {"n_fits": len(part), "n_used": int(ok.sum()), "n_flagged": int(bad[part.index].sum()),
                      "n_bad_loss": int((~ok & ~bad[part.index]).sum())}
            row: dict[str, object] = {"series": s["name"], "loss": loss}
            if part.loc[ok, "n"].nunique() >= 2:
                fitted = fit_rate(part.loc[ok, "n"].to_numpy(), part.loc[ok, loss].to_numpy(dtype=float),
                                  n_boot=n_boot, level=level, seed=0).as_dict()
                row.update({k: v for k, v in fitted.items() if k not in row})
            else:
                row.update({k: np.nan for k in RATE_COLUMNS[2:]})
            row.update(counts)
            rows.append(row)
    table = pd.DataFrame(rows)
    rest = [c for c in table.columns if c not in RATE_COLUMNS]
    return table[RATE_COLUMNS + rest]


def summary_table(results: pd.DataFrame, config: SweepConfig) -> pd.DataFrame:
    """One row per (series, n): counts of fits (flagged, converged) and loss statistics.

    For every loss ``L``: ``L_mean``, ``L_sd`` (ddof 1), ``L_median`` over the usable fits.
    """
    rows = []
    bad = flagged(results)
    for s in config.series:
        for n in config.sizes:
            part = results[(results["series"] == s["name"]) & (results["n"] == n)]
            row: dict[str, object] = {"series": s["name"], "n": n, "n_fits": len(part),
                                      "n_flagged": int(bad[part.index].sum())}
            for col in ("diverged", "on_boundary", "converged"):
                if col in part:
                    row[f"n_{col}"] = int(part[col].astype(bool).sum())
            for loss in loss_columns(config):
                v = part.loc[usable(part, loss), loss].to_numpy(dtype=float)
                row[f"{loss}_n"] = len(v)
                row[f"{loss}_mean"] = float(v.mean()) if len(v) else np.nan
                row[f"{loss}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else np.nan
                row[f"{loss}_median"] = float(np.median(v)) if len(v) else np.nan
            rows.append(row)
    return pd.DataFrame(rows)


def format_rates(rates: pd.DataFrame) -> str:
    """The rates table as aligned text (what ``hmoe-sim report`` prints)."""
    cols = [c for c in ["series", "loss", "slope", "ci_low", "ci_high", "n_min", "n_max", "preferred", "n_used",
                        "n_flagged"] if c in rates]
    shown = rates[cols].copy()
    for c in ("slope", "ci_low", "ci_high"):
        shown[c] = shown[c].map(lambda v: f"{v:+.3f}" if np.isfinite(v) else "nan")
    return shown.to_string(index=False)
