"""What the stored parameter vectors of a sweep give back, without refitting.

Every fit of ``results.parquet`` carries the kept start's parameter vector (column ``params``,
float64, in ``fit_model.flatten`` order of its series' fitted model). :func:`stored_params`
turns the rows of one (truth, series) back into batched parameters, :func:`recompute_losses`
scores them again (the losses a cell recorded, from the truth regenerated from the
configuration), and :func:`d1_sources_table` says where ``D1`` comes from at the two ends of
each series' effective-sample-size axis (``d1_sources.csv``): the share of the cell masses, of
the atom locations and of the atoms at the box (:func:`hmoe_sim.losses.d1_sources`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from hmoe_sim.devices import resolve_dtype
from hmoe_sim.losses import atoms_at_box, d1_sources_for
from hmoe_sim.models.base import Params
from hmoe_sim.sweep.cell import fit_losses
from hmoe_sim.sweep.config import SweepConfig
from hmoe_sim.sweep.report import loss_columns, usable
from hmoe_sim.sweep.setup import SeriesSetup, fit_bounds, series_setup

__all__ = ["D1_SOURCE_COLUMNS", "d1_sources_table", "has_stored_params", "recompute_losses", "stored_params"]

#: columns of ``d1_sources.csv``
D1_SOURCE_COLUMNS = ["truth", "series", "end", "n", "noise_std", "n_eff", "n_fits", "D1_mean", "mass_share",
                     "location_share", "box_share", "n_fits_at_box", "n_atoms_at_box"]


def has_stored_params(results: pd.DataFrame) -> bool:
    """Whether every fit of ``results`` carries its parameter vector (runs before they were stored do not)."""
    return "params" in results and bool(results["params"].map(lambda v: isinstance(v, np.ndarray | list)).all())


def stored_params(config: SweepConfig, rows: pd.DataFrame, *,
                  dtype: torch.dtype | None = None) -> tuple[SeriesSetup, Params]:
    """The series setup and the batched parameters ``(len(rows), ...)`` of fits of one (truth, series).

    Parameters
    ----------
    config : SweepConfig
        The sweep's configuration (the truth and the fitted model are regenerated from it).
    rows : pandas.DataFrame
        Rows of ``results.parquet`` of one truth and one series (controls included).
    dtype : torch.dtype, optional
        Default: the configuration's ``dtype`` (the precision the losses were computed in).

    Raises
    ------
    ValueError
        No rows, rows of several truths or series, a row without a parameter vector (a run
        from before they were stored), or a vector of the wrong length.
    """
    if rows.empty:
        raise ValueError("no fits given")
    keys = sorted({(int(t), str(s)) for t, s in zip(rows["truth"], rows["series"], strict=True)})
    if len(keys) != 1:
        raise ValueError(f"fits of one (truth, series) expected, got {keys[:4]}")
    if not has_stored_params(rows):
        raise ValueError("these results carry no parameter vectors (column 'params'): they were computed before "
                         "parameters were stored; rerun the sweep into a new directory to store them")
    truth, name = keys[0]
    setup = series_setup(config, config.series_named(name), truth)
    theta = np.stack([np.asarray(v, dtype=np.float64) for v in rows["params"]])
    n_params = setup.fit_model.n_params
    if theta.shape[1] != n_params:
        raise ValueError(f"stored parameter vectors have {theta.shape[1]} entries, but series {name!r} fits "
                         f"{n_params} parameters")
    tensor = torch.from_numpy(theta).to(resolve_dtype(config.dtype) if dtype is None else dtype)
    return setup, setup.fit_model.unflatten(tensor)


def _groups(results: pd.DataFrame) -> list[tuple[tuple[int, str], pd.DataFrame]]:
    return [((int(t), str(s)), part) for (t, s), part in results.groupby(["truth", "series"], sort=True)]


def recompute_losses(config: SweepConfig, results: pd.DataFrame) -> pd.DataFrame:
    """Every configured loss of every fit, recomputed from its stored parameters.

    The same scoring as a cell's (:func:`hmoe_sim.sweep.cell.fit_losses`: the Voronoi losses
    and the L2 error against the truth regenerated from the configuration, in its dtype).

    Returns
    -------
    pandas.DataFrame
        One column per loss (``D1``, ``D2``, ``L2`` as configured), on ``results``' index.
    """
    out = pd.DataFrame(index=results.index, columns=loss_columns(config), dtype=float)
    for _, part in _groups(results):
        setup, params = stored_params(config, part)
        for name, values in fit_losses(setup.fit_model, params, setup, config).items():
            out.loc[part.index, name] = values
    return out


def _points(part: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The fits of one (truth, series) at the ends of its axis, and of its noise-free control at the largest n.

    The noisy fits at the (n, sigma) of smallest and of largest ``n_eff`` (all of them, usable or
    not), then the control's.
    """
    control = part["control"].fillna("").astype(str)
    noisy, free = part[control == ""], part[control == "noise_free"]
    out = []
    if len(noisy):
        at = noisy.groupby(["n", "noise_std"], sort=True)["n_eff"].first()
        for end, pick in (("smallest_n_eff", np.argmin), ("largest_n_eff", np.argmax)):
            n, sigma = at.index[int(pick(at.to_numpy()))]
            out.append((end, noisy[(noisy["n"] == n) & (noisy["noise_std"] == sigma)]))
    if len(free):
        out.append(("noise_free", free[free["n"] == free["n"].max()]))
    return out


def d1_sources_table(config: SweepConfig, results: pd.DataFrame) -> pd.DataFrame:
    """Where ``D1`` comes from, per (truth, series), at its smallest and largest effective sample size.

    One row per (truth, series, end): ``end`` is ``smallest_n_eff`` or ``largest_n_eff`` (the
    noisy fits at the (n, sigma) of least and of largest ``n_eff = n / sigma**2``), and
    ``noise_free`` (the noise-free control at the largest n, the sigma = 0 end) when the run
    has that control. Over the fits of that point whose ``D1`` is usable (``n_fits``: the rates'
    policy, :func:`hmoe_sim.sweep.report.usable`; every finite ``D1`` for the control):
    ``D1_mean`` and the shares of the summed ``D1`` from the cell masses, the atom locations and
    the atoms at the box (``mass_share + location_share + box_share = 1``;
    :func:`hmoe_sim.losses.d1_sources` with the series' fit box), ``n_fits_at_box`` (fits with
    at least one atom at the box) and ``n_atoms_at_box`` (atoms at the box over those fits). A
    point without a usable fit has ``n_fits = 0`` and NaN shares.

    Raises
    ------
    ValueError
        The configuration records no ``D1``, or the results carry no parameter vectors.
    """
    if "D1" not in loss_columns(config):
        raise ValueError("the configuration records no D1 (losses.kinds)")
    rows = []
    for (truth, name), part in _groups(results):
        bounds = fit_bounds(config.series_named(name).fit.bounds)
        for end, at in _points(part):
            d1 = at["D1"].to_numpy(dtype=float)
            fits = at[np.isfinite(d1)] if end == "noise_free" else at[usable(at, "D1")]
            row: dict[str, object] = {"truth": truth, "series": name, "end": end, "n": int(at["n"].iloc[0]),
                                      "noise_std": float(at["noise_std"].iloc[0]),
                                      "n_eff": float(at["n_eff"].iloc[0]), "n_fits": len(fits)}
            if fits.empty:
                rows.append(row)
                continue
            setup, params = stored_params(config, fits)
            parts = d1_sources_for(setup.fit_model, params, setup.score_model, setup.score_truth, bounds)
            at_box = atoms_at_box(setup.fit_model, params, bounds).sum(-1).cpu().numpy()
            total = float(parts["D1"].sum())
            row["D1_mean"] = total / len(fits)
            for key in ("mass", "location", "box"):
                row[f"{key}_share"] = float(parts[key].sum()) / total if total > 0 else np.nan
            row["n_fits_at_box"] = int((at_box > 0).sum())
            row["n_atoms_at_box"] = int(at_box.sum())
            rows.append(row)
    return pd.DataFrame(rows, columns=D1_SOURCE_COLUMNS)
