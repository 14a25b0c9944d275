"""Tables from a sweep's per-fit results: rates per (series, loss) and per-size summaries.

A fit is *flagged* when the estimator reports it diverged, or when it ended on the boundary
of the parameter box at a kind (``"name:side"``, column ``boundary_params``) listed in the
exclusion policy (:data:`EXCLUDED_BOUNDARY`; empty by default: the estimator the theory
studies is least squares over the compact box, so a certified fit at the box is one of its
values -- paper_notes/05 section 5.5 gives the reason). Flagged fits, and fits whose loss is
not a finite positive number, are counted in every table and never enter a mean or the main
slope. Every rate is also given over *all* fits of finite loss (columns ``*_all``) and over
the fits strictly *inside* the box (``*_inside``: every boundary fit dropped), so that the
policy can be judged.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from itertools import product

import numpy as np
import pandas as pd

from hmoe_sim.equivalence import upper_range
from hmoe_sim.estimators.result import count_at_iteration_cap
from hmoe_sim.identifiability import flat_directions, loss_floor
from hmoe_sim.rates import fit_rate, ladder_exponent
from hmoe_sim.sweep.axes import (
    AXIS_COLUMN,
    axis_values,
    bootstrap_cells,
    equivalence_columns,
    fixed_noise,
    has_noise_axis,
    noise_cells,
)
from hmoe_sim.sweep.config import SeriesConfig, SweepConfig
from hmoe_sim.sweep.setup import SeriesSetup, series_setup
from hmoe_sim.verdicts import FLOOR_TOLERANCE, SeriesEvidence, rate_verdict

__all__ = ["loss_columns", "flagged", "usable", "rates_table", "summary_table", "format_rates", "RATE_COLUMNS",
           "EXCLUDED_BOUNDARY", "boundary_excluded", "boundary_table", "format_boundary", "worse_than_truth",
           "loss_floors", "flat_counts", "upper_half", "protocol_is_start"]

#: leading columns of ``rates.csv``
RATE_COLUMNS = ["truth", "series", "loss", "axis", "slope", "ci_low", "ci_high", "n_min", "n_max"]
#: columns of a rate fit that are NaN when no slope can be fitted
_FIT_COLUMNS = RATE_COLUMNS[4:]

#: Boundary kinds (``"name:side"``, e.g. ``"beta1:hi"``) that exclude a fit from means and the
#: main slope. Empty: no kind does. ``beta0:lo`` (an atom switched off) and the shared gauge
#: (``W1, W2, w3, z``) move no atom; ``a``, ``b``, ``beta1`` at the box in the non-shared model
#: are the escape along the flat directions behind the slow rate, i.e. the behaviour under
#: test, and dropping them would bias exactly the slow series towards a fast rate.
EXCLUDED_BOUNDARY: frozenset[str] = frozenset()


def loss_columns(config: SweepConfig) -> list[str]:
    """The loss columns a sweep records (``D1``, ``D2``, ``L2`` as configured)."""
    return config.losses.columns


def _labels(results: pd.DataFrame) -> pd.Series:
    if "boundary_params" not in results:
        return pd.Series("", index=results.index)
    return results["boundary_params"].fillna("").astype(str)


def boundary_excluded(results: pd.DataFrame, exclude: Collection[str] = EXCLUDED_BOUNDARY) -> pd.Series:
    """Per fit: on the boundary at some kind in ``exclude``.

    Results without a ``boundary_params`` column (older runs) cannot be judged per kind:
    there every boundary fit counts as excluded when ``exclude`` is not empty.
    """
    on = results["on_boundary"].astype(bool) if "on_boundary" in results else pd.Series(False, index=results.index)
    if not exclude:
        return pd.Series(False, index=results.index)
    if "boundary_params" not in results:
        return on
    labels = _labels(results)
    hit = labels.map(lambda s: any(k in exclude for k in s.split(",") if k))
    return on & hit


def flagged(results: pd.DataFrame, exclude: Collection[str] = EXCLUDED_BOUNDARY) -> pd.Series:
    """Per fit: diverged, or on the boundary at an excluded kind (:func:`boundary_excluded`)."""
    out = boundary_excluded(results, exclude).copy()
    if "diverged" in results:
        out |= results["diverged"].astype(bool)
    return out


def worse_than_truth(results: pd.DataFrame, loglik_margin: float | None = None) -> pd.Series:
    """Per fit: its empirical risk exceeds the truth's on the same data (a least-squares fit never does).

    With ``loglik_margin`` ``None`` a relative margin of ``1e-9`` absorbs rounding. With a
    margin (a series' ``fit.near_optimal_loglik``) a fit counts only when the truth would not
    be near-optimal beside it: ``risk - risk_truth > (2 margin / n) risk_truth``, the
    first-order form of ``(n/2) log(RSS / RSS_truth) > margin``
    (:func:`hmoe_sim.sweep.runner.near_optimal`). NaN risks count as worse.
    """
    if "risk" not in results or "risk_truth" not in results:
        return pd.Series(False, index=results.index)
    risk, truth = results["risk"].to_numpy(dtype=float), results["risk_truth"].to_numpy(dtype=float)
    ok = np.isfinite(truth)
    if loglik_margin is None:
        slack = truth * 1e-9
    else:
        slack = 2.0 * float(loglik_margin) / results["n"].to_numpy(dtype=float) * truth
    worse = ok & ~(risk - truth <= slack)
    return pd.Series(worse, index=results.index)


def usable(results: pd.DataFrame, loss: str, *, fits: str = "policy",
           exclude: Collection[str] = EXCLUDED_BOUNDARY) -> pd.Series:
    """Per fit: the loss is finite and positive, and the fit belongs to the chosen set.

    ``fits``: ``"policy"`` (not :func:`flagged`), ``"all"`` (every fit) or ``"inside"``
    (neither diverged nor on the boundary at any kind).
    """
    values = results[loss].to_numpy(dtype=float)
    good = pd.Series(np.isfinite(values) & (values > 0), index=results.index)
    if fits == "all":
        return good
    if fits == "inside":
        out = good.copy()
        for col in ("diverged", "on_boundary"):
            if col in results:
                out &= ~results[col].astype(bool)
        return out
    if fits != "policy":
        raise ValueError(f"fits must be 'policy', 'all' or 'inside', got {fits!r}")
    return ~flagged(results, exclude) & good


def _rate(part: pd.DataFrame, ok: pd.Series, loss: str, n_boot: int, level: float) -> dict[str, object]:
    if part.loc[ok, AXIS_COLUMN].nunique() < 2:
        return {k: np.nan for k in _FIT_COLUMNS}
    chosen = part[ok]
    return fit_rate(chosen[AXIS_COLUMN].to_numpy(), chosen[loss].to_numpy(dtype=float),
                    n_boot=n_boot, level=level, seed=0, cells=bootstrap_cells(chosen)).as_dict()


def _slope_columns(suffix: str, fit: dict[str, object]) -> dict[str, object]:
    return {f"slope_{suffix}": fit["slope"], f"ci_low_{suffix}": fit["ci_low"], f"ci_high_{suffix}": fit["ci_high"]}


def _parts(results: pd.DataFrame, truth: int, series: str) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The rows of one (truth, series): the series itself and each of its controls.

    Results without a ``truth`` column (a single-truth table) are taken whole for every truth.
    """
    rows = results[results["series"] == series]
    if "truth" in rows:
        rows = rows[rows["truth"] == truth]
    control = rows["control"].fillna("").astype(str) if "control" in rows else pd.Series("", index=rows.index)
    return rows[control == ""], {c: rows[control == c] for c in dict.fromkeys(control) if c}


def _median_at(part: pd.DataFrame, loss: str, n: float, column: str = "n") -> float:
    """Median finite loss where ``column`` equals ``n`` (zeros included: a control may reach exact zero)."""
    v = part.loc[part[column] == n, loss].to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else np.nan


def upper_half(sizes: list[int]) -> list[int]:
    """The upper half of the n grid (``sizes[len // 2:]``), the rule fixed before any run
    (:func:`hmoe_sim.rates.upper_range`)."""
    return [int(v) for v in upper_range(sizes)]


def _voronoi_cases(config: SweepConfig) -> Iterator[tuple[tuple[int, str, str], SeriesSetup]]:
    """Every (truth, series, Voronoi loss) key of ``config`` with the series' setup on that truth."""
    kinds = [loss for loss in loss_columns(config) if loss != "L2"]
    for s in config.series:
        for t in s.truth_seeds:
            setup = series_setup(config, s, t)
            for loss in kinds:
                yield (t, s.name, loss), setup


def loss_floors(config: SweepConfig) -> dict[tuple[int, str, str], float]:
    """:func:`hmoe_sim.identifiability.loss_floor` per (truth, series, loss); ``L2`` has floor 0."""
    out = {(t, s.name, "L2"): 0.0 for s in config.series for t in s.truth_seeds if "L2" in loss_columns(config)}
    for key, setup in _voronoi_cases(config):
        out[key] = float(loss_floor(setup.fit_model, setup.score_model, setup.score_truth, key[2],
                                    r=config.losses.r))
    return out


def flat_counts(config: SweepConfig) -> dict[tuple[int, str, str], tuple[int, int]]:
    """:func:`hmoe_sim.identifiability.flat_directions` per (truth, series, loss) for the Voronoi losses."""
    return {key: tuple(flat_directions(setup.fit_model, setup.score_model, setup.score_truth, key[2],
                                       r=config.losses.r))
            for key, setup in _voronoi_cases(config)}


def _diagnostics(main: pd.DataFrame, ok: pd.Series, controls: dict[str, pd.DataFrame], loss: str,
                 config: SweepConfig, n_boot: int, level: float, axis: str) -> dict[str, object]:
    """Upper-half, worst-case, spread and noise-free-control columns of one rates row.

    On the n axis the upper half is :func:`upper_half` of the configured sizes; on n_eff,
    :func:`hmoe_sim.rates.upper_range` of the series' n_eff values; ``noisy_level`` is the median
    at the largest value of the axis. The noise-free control (sigma = 0, the right end of the
    n_eff axis) is fitted against n on both axes, its level taken at the largest n.
    """
    row: dict[str, object] = {}
    on_n = axis == "n"
    upper_values = upper_half(config.sizes) if on_n else upper_range(main[AXIS_COLUMN])
    upper = ok & main[AXIS_COLUMN].isin(upper_values)
    row.update(_slope_columns("upper", _rate(main, upper, loss, n_boot, level)))
    worst_col = f"{loss}_max"
    if worst_col in main:
        worst_ok = ok & np.isfinite(main[worst_col].to_numpy(dtype=float)) & (main[worst_col] > 0)
        row.update(_slope_columns("worst", _rate(main, worst_ok, worst_col, n_boot, level)))
        best = main.loc[ok, loss].to_numpy(dtype=float)
        spread = (main.loc[ok, worst_col].to_numpy(dtype=float) - main.loc[ok, f"{loss}_min"].to_numpy(dtype=float))
        row["spread_ratio"] = float(np.nanmedian(spread / best)) if len(best) else np.nan
    else:
        row.update(_slope_columns("worst", {"slope": np.nan, "ci_low": np.nan, "ci_high": np.nan}))
        row["spread_ratio"] = np.nan
    n_max = max(config.sizes)
    axis_max = n_max if on_n else (float(main[AXIS_COLUMN].max()) if len(main) else np.nan)
    row["noisy_level"] = _median_at(main, loss, axis_max, AXIS_COLUMN)
    ladder = config.control_perturbations
    rungs = [(p, _median_at(controls[name], loss, n_max)) for name, p in ladder.items() if name in controls]
    row["control_perturb_exponent"] = ladder_exponent(*zip(*rungs, strict=True), row["noisy_level"]) \
        if rungs else np.nan
    row["control_perturb_levels"] = "; ".join(f"{p:g}: {v:.3g}" for p, v in rungs)
    control = controls.get("noise_free")
    if control is None or control.empty:
        row.update({"control_slope": np.nan, "control_ci_low": np.nan, "control_ci_high": np.nan,
                    "control_level": np.nan})
    else:
        c_ok = usable(control, loss, fits="all")
        c_fit = _rate(axis_values(control, "n"), c_ok, loss, n_boot, level)
        row.update({"control_slope": c_fit["slope"], "control_ci_low": c_fit["ci_low"],
                    "control_ci_high": c_fit["ci_high"], "control_level": _median_at(control, loss, n_max)})
    return row


def protocol_is_start(series: SeriesConfig) -> bool:
    """The series' start and iteration budget are the protocol under test (the papers' SGD)."""
    return series.fit.method == "sgd-paper"


def _protocol_columns(main: pd.DataFrame, ok: pd.Series, series: SeriesConfig, loss: str) -> dict[str, object]:
    """How the noisy fits of one series were optimised: convergence, misses, truth-free starts."""
    fit = series.fit
    kept = main[ok]
    converged = kept["converged"].astype(bool).to_numpy() if "converged" in kept else np.zeros(len(kept), bool)
    worse = worse_than_truth(main, fit.near_optimal_loglik)
    finite = np.isfinite(main["risk"].to_numpy(dtype=float)) if "risk" in main else np.zeros(len(main), bool)
    row: dict[str, object] = {
        "n_converged": int(converged.sum()),
        "converged_fraction": float(converged.mean()) if len(kept) else np.nan,
        "n_worse_beyond_margin": int(worse.sum()),
        "worse_fraction": float(worse.sum() / max(int(finite.sum()), 1)) if len(main) else np.nan,
        "n_random_starts": fit.random_starts,
    }
    if fit.random_starts and "start" in kept and len(kept):
        row["best_random_fraction"] = float((kept["start"].to_numpy() >= fit.n_starts).mean())
    else:
        row["best_random_fraction"] = np.nan
    return row


def _evidence(row: dict[str, object], series: SeriesConfig, controls: dict[str, pd.DataFrame]) -> SeriesEvidence:
    """The :class:`hmoe_sim.rates.SeriesEvidence` of one rates row."""
    def num(key: str) -> float:
        value = row.get(key, np.nan)
        return float(value) if value is not None else float("nan")

    protocol = protocol_is_start(series)
    n_sizes = row.get("n_sizes", 0)
    return SeriesEvidence(
        axis=str(row["axis"]), equivalence_diff=num("equivalence_diff"),
        equivalence_ci_low=num("equivalence_ci_low"), equivalence_ci_high=num("equivalence_ci_high"),
        has_control="noise_free" in controls and not controls["noise_free"].empty,
        truth_free_starts=protocol or series.fit.random_starts > 0, protocol_start=protocol,
        slope=num("slope"), ci_low=num("ci_low"), ci_high=num("ci_high"),
        n_sizes=int(n_sizes) if np.isfinite(float(n_sizes)) else 0, n_min=num("n_min"), n_max=num("n_max"),
        upper_ci_low=num("ci_low_upper"), upper_ci_high=num("ci_high_upper"),
        converged_fraction=num("converged_fraction"), worse_fraction=num("worse_fraction"),
        control_ci_low=num("control_ci_low"), control_ci_high=num("control_ci_high"),
        control_level=num("control_level"), noisy_level=num("noisy_level"), loss_floor=num("loss_floor"),
        spread_ratio=num("spread_ratio"), worst_ci_low=num("ci_low_worst"), worst_ci_high=num("ci_high_worst"))


def rates_table(results: pd.DataFrame, config: SweepConfig, *, n_boot: int = 2000, level: float = 0.95,
                exclude: Collection[str] = EXCLUDED_BOUNDARY,
                floors: dict[tuple[int, str, str], float] | None = None,
                flats: dict[tuple[int, str, str], tuple[int, int]] | None = None) -> pd.DataFrame:
    """One row per (truth, series, loss, axis): the fitted log-log slope with its CI and its verdict.

    ``axis`` is ``"n"`` (the sample size) for every series; a series whose noisy fits have several
    noise levels at some n (a noise ladder, :func:`has_noise_axis`) has its ``"n"`` rows fitted
    at its largest sigma (:func:`hmoe_sim.sweep.axes.fixed_noise`) and also gets ``"n_eff"`` rows, fitted against
    ``n / sigma^2`` over every (n, sigma) with the bootstrap resampling within each (n, sigma).
    On an ``n_eff`` row ``n_min, n_max, n_sizes`` and the ``upper`` slope (the upper half of the
    distinct n_eff values, :func:`hmoe_sim.rates.upper_range`) are on n_eff, and ``noisy_level``
    is the median at the largest n_eff. Every row has ``noise_std`` (the sigma of its fits; NaN
    when several or none recorded) and the matched-size columns of :func:`hmoe_sim.sweep.axes.equivalence_columns`
    (``equivalence, n_matched, n_matched_upper, equivalence_n_eff, equivalence_diff,
    equivalence_ci_low, equivalence_ci_high``; empty and NaN on the n axis).

    Columns: ``truth, series, loss, axis, slope, ci_low, ci_high, n_min, n_max`` then the rest of
    :meth:`hmoe_sim.rates.RateFit.as_dict` (power-law vs log-model comparison), then
    ``n_fits`` (rows of the series), ``n_used``, ``n_flagged`` (diverged or on the boundary at
    an excluded kind), ``n_bad_loss`` (unflagged fits whose loss is not finite and positive),
    ``n_diverged``, ``n_on_boundary`` (any kind), ``n_boundary_excluded``,
    ``n_worse_than_truth`` (:func:`worse_than_truth`), two sensitivity fits of the same
    model, ``slope_S, ci_low_S, ci_high_S, preferred_S, n_used_S`` for ``S = all`` (every fit
    of finite positive loss) and ``S = inside`` (only fits strictly inside the box); the
    slope over the upper half of the n grid (``*_upper``, :func:`upper_half`); the
    diagnostics of issue "rates that cannot be artefacts": ``slope_worst, ci_low_worst,
    ci_high_worst`` (the rate of the largest near-optimal loss), ``spread_ratio`` (median over
    fits of ``(max - min) / best`` over the near-optimal starts), ``control_slope,
    control_ci_low, control_ci_high, control_level`` (the noise-free control; its median loss
    at the largest n), ``control_perturb_exponent`` and ``control_perturb_levels`` (the
    exponent ``a`` of ``level ~ p^a`` over the control-perturbation ladder,
    :func:`hmoe_sim.rates.ladder_exponent`: NaN when the widest rung is at round-off, since a
    ratio of round-off levels is round-off -- and its ``p: level``
    pairs; NaN and empty without a ladder), ``noisy_level`` (the series' median at the largest n), ``loss_floor``
    (:func:`loss_floors`); ``identifiable`` (the floor is at most
    :data:`hmoe_sim.rates.FLOOR_TOLERANCE`: every exact representation of the truth in the fitted
    class has zero loss -- a property of the class, decided by no fit); how the noisy fits were
    optimised: ``n_converged, converged_fraction`` (of the kept fits), ``n_worse_beyond_margin,
    worse_fraction`` (:func:`worse_than_truth` with the series' near-optimal margin),
    ``n_random_starts`` and ``best_random_fraction`` (how often the kept start was a random
    one); and ``verdict, evidence`` (:func:`hmoe_sim.rates.rate_verdict`: the verdict and the
    test that decided it, in words).

    ``floors`` defaults to :func:`loss_floors` of ``config``, ``flats`` (columns ``n_flat,
    n_flat_loss``; missing keys give NaN) to :func:`flat_counts`.
    """
    rows = []
    floors = loss_floors(config) if floors is None else floors
    flats = flat_counts(config) if flats is None else flats
    bad, excl, worse = flagged(results, exclude), boundary_excluded(results, exclude), worse_than_truth(results)
    for truth in config.truth_seeds:
        for s in config.series:
            if truth not in s.truth_seeds:
                continue
            noisy, controls = _parts(results, truth, s.name)
            axes = [("n", axis_values(fixed_noise(noisy), "n"))]
            if has_noise_axis(noisy):
                axes.append(("n_eff", axis_values(noisy, "n_eff")))
            for loss, (axis, main) in product(loss_columns(config), axes):
                idx = main.index
                ok = usable(main, loss, exclude=exclude)
                counts = {"n_fits": len(main), "n_used": int(ok.sum()), "n_flagged": int(bad[idx].sum()),
                          "n_bad_loss": int((~ok & ~bad[idx]).sum()),
                          "n_diverged": int(main["diverged"].astype(bool).sum()) if "diverged" in main else 0,
                          "n_on_boundary": int(main["on_boundary"].astype(bool).sum()) if "on_boundary" in main
                          else 0,
                          "n_boundary_excluded": int(excl[idx].sum()), "n_worse_than_truth": int(worse[idx].sum())}
                row: dict[str, object] = {"truth": truth, "series": s.name, "loss": loss, "axis": axis}
                row.update({k: v for k, v in _rate(main, ok, loss, n_boot, level).items() if k not in row})
                sigma = main["noise_std"].unique() if "noise_std" in main else []
                row["noise_std"] = float(sigma[0]) if len(sigma) == 1 else np.nan
                row.update(counts)
                for which in ("all", "inside"):
                    chosen = usable(main, loss, fits=which)
                    sens = _rate(main, chosen, loss, n_boot, level)
                    row.update(_slope_columns(which, sens))
                    row.update({f"preferred_{which}": sens.get("preferred", ""), f"n_used_{which}": int(chosen.sum())})
                row.update(_diagnostics(main, ok, controls, loss, config, n_boot, level, axis))
                row.update(equivalence_columns(main, ok, loss, n_boot, level))
                row["loss_floor"] = floors.get((truth, s.name, loss), np.nan)
                row.update(_protocol_columns(main, ok, s, loss))
                floor = float(row["loss_floor"])
                row["identifiable"] = bool(floor <= FLOOR_TOLERANCE) if np.isfinite(floor) else None
                row["n_flat"], row["n_flat_loss"] = flats.get((truth, s.name, loss), (np.nan, np.nan))
                row["verdict"], row["evidence"] = rate_verdict(_evidence(row, s, controls))
                rows.append(row)
    table = pd.DataFrame(rows)
    rest = [c for c in table.columns if c not in RATE_COLUMNS]
    return table[RATE_COLUMNS + rest]


def summary_table(results: pd.DataFrame, config: SweepConfig, *,
                  exclude: Collection[str] = EXCLUDED_BOUNDARY) -> pd.DataFrame:
    """One row per (truth, series, control, n, noise level): fit counts (flagged, converged, ...) and loss statistics.

    With the results' ``noise_std`` column the rows carry ``noise_std`` and ``n_eff`` after ``n``
    (one row per noise level on a noise axis).

    For every loss ``L``: ``L_mean``, ``L_sd`` (ddof 1), ``L_median`` over the usable fits,
    ``L_median_inside`` over the fits strictly inside the box, and ``L_max_median``, the
    median of the largest near-optimal loss. Control rows (``control = "noise_free"``) use
    every fit of finite loss (a control may reach round-off).

    When some series has a noise ladder (:func:`hmoe_sim.sweep.axes.has_noise_axis`), rows are per (truth, series,
    control, n, noise level) and carry ``noise_std`` and ``n_eff`` (``n / sigma^2``; ``inf`` for a
    control, ``sigma = 0``), after ``n``; otherwise the table is as without a ladder.
    """
    rows = []
    noisy = results[results["control"].fillna("").astype(str) == ""] if "control" in results else results
    ladder = any(has_noise_axis(part) for _, part in noisy.groupby("series"))
    bad, excl, worse = flagged(results, exclude), boundary_excluded(results, exclude), worse_than_truth(results)
    for truth in config.truth_seeds:
        for s in config.series:
            if truth not in s.truth_seeds:
                continue
            main, controls = _parts(results, truth, s.name)
            for control, rows_of in [("", main), *controls.items()]:
                for n, sigma, part in noise_cells(rows_of, config.sizes, ladder):
                    if control in config.control_perturbations and part.empty:
                        continue  # a ladder rung is fitted at the largest n only
                    row: dict[str, object] = {"truth": truth, "series": s.name, "control": control, "n": n}
                    if ladder:
                        row.update({"noise_std": sigma, "n_eff": n / sigma**2 if sigma > 0 else np.inf})
                    row.update({"n_fits": len(part), "n_flagged": int(bad[part.index].sum())})
                    for col in ("diverged", "on_boundary", "converged"):
                        row[f"n_{col}"] = int(part[col].astype(bool).sum()) if col in part else 0
                    row["n_boundary_excluded"] = int(excl[part.index].sum())
                    # a control's truth has risk exactly 0, so every control fit would count
                    row["n_worse_than_truth"] = np.nan if control else int(worse[part.index].sum())
                    row["n_at_max_iter"] = count_at_iteration_cap(part.get("n_iter", []), max_iter=s.fit.max_iter,
                                                                  method=s.fit.method)
                    for loss in loss_columns(config):
                        chosen = usable(part, loss, exclude=exclude) if not control else \
                            pd.Series(np.isfinite(part[loss].to_numpy(dtype=float)), index=part.index)
                        v = part.loc[chosen, loss].to_numpy(dtype=float)
                        v_in = part.loc[usable(part, loss, fits="inside"), loss].to_numpy(dtype=float)
                        row[f"{loss}_n"] = len(v)
                        row[f"{loss}_mean"] = float(v.mean()) if len(v) else np.nan
                        row[f"{loss}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else np.nan
                        row[f"{loss}_median"] = float(np.median(v)) if len(v) else np.nan
                        row[f"{loss}_median_inside"] = float(np.median(v_in)) if len(v_in) else np.nan
                        worst = part.loc[chosen, f"{loss}_max"].to_numpy(dtype=float) if f"{loss}_max" in part \
                            else np.array([])
                        worst = worst[np.isfinite(worst)]
                        row[f"{loss}_max_median"] = float(np.median(worst)) if len(worst) else np.nan
                    rows.append(row)
    return pd.DataFrame(rows)


def boundary_table(results: pd.DataFrame, exclude: Collection[str] = EXCLUDED_BOUNDARY) -> pd.DataFrame:
    """Fits per (series, boundary kind): how many fits ended at each ``"name:side"`` of the box.

    A fit at several kinds counts once under each. Columns ``series, kind, n_fits, excluded``
    (``excluded``: the kind is in ``exclude``); empty when no fit is on the boundary or the
    results carry no ``boundary_params``.
    """
    rows = []
    labels = _labels(results)
    for name in dict.fromkeys(results["series"]):
        counts: dict[str, int] = {}
        for text in labels[results["series"] == name]:
            for kind in (k for k in text.split(",") if k):
                counts[kind] = counts.get(kind, 0) + 1
        rows += [{"series": name, "kind": k, "n_fits": c, "excluded": k in exclude}
                 for k, c in sorted(counts.items())]
    return pd.DataFrame(rows, columns=["series", "kind", "n_fits", "excluded"])


def format_boundary(table: pd.DataFrame) -> str:
    """One line per series: ``kind count`` pairs, excluded kinds marked with ``*``."""
    if table.empty:
        return "no fit on the boundary of the parameter box"
    lines = []
    for name, part in table.groupby("series", sort=False):
        items = ", ".join(f"{r.kind}{'*' if r.excluded else ''} {int(r.n_fits)}" for r in part.itertuples())
        lines.append(f"  {name}: {items}")
    return "\n".join(["fits at the box per kind (a fit may count under several; * = kind that excludes the fit "
                      "from means and the main slope):", *lines])


def format_rates(rates: pd.DataFrame) -> str:
    """The rates table as aligned text (what ``hmoe-sim report`` prints): every slope with its verdict,
    the worst-case and upper-half slopes, the spread and the noise-free control."""
    cols = [c for c in ["truth", "series", "loss", "axis", "slope", "ci_low", "ci_high", "verdict", "n_used",
                        "n_flagged", "slope_upper", "slope_worst", "ci_low_worst", "ci_high_worst", "spread_ratio",
                        "control_slope", "control_level", "loss_floor", "slope_inside", "n_used_inside",
                        "equivalence_diff"] if c in rates]
    for single in ("truth", "axis"):
        if single in cols and rates[single].nunique() == 1:
            cols.remove(single)
    if "equivalence_diff" in cols and not np.isfinite(rates["equivalence_diff"].to_numpy(dtype=float)).any():
        cols.remove("equivalence_diff")
    shown = rates[cols].copy()
    for c in ("slope", "ci_low", "ci_high", "slope_upper", "slope_worst", "ci_low_worst", "ci_high_worst",
              "control_slope", "slope_inside", "equivalence_diff"):
        if c in shown:
            shown[c] = shown[c].map(lambda v: f"{v:+.3f}" if np.isfinite(v) else "nan")
    for c in ("spread_ratio", "control_level", "loss_floor"):
        if c in shown:
            shown[c] = shown[c].map(lambda v: f"{v:.3g}")
    return shown.to_string(index=False)
