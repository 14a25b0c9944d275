"""Figures of a sweep's convergence rates: loss against n or n/sigma^2, and forest plots of slopes.

Functions take the sweep's tables (``summary.csv``, ``rates.csv``, ``per_truth.csv``,
``ensemble.csv``) and return the matplotlib ``Figure`` (:mod:`hmoe_sim.plotting`).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from hmoe_sim.rates import RATE_OVERSPECIFIED, RATE_PARAMETRIC

__all__ = ["REFERENCE_SLOPES", "STRUCTURE_LABELS", "series_labels", "plot_rate_axes", "plot_rate_panels", "plot_forest",
           "plot_neff_axes", "plot_neff_panels"]


#: theorem reference slopes drawn dashed: parametric n^-1/2 and over-specified atoms n^-1/4
REFERENCE_SLOPES: dict[str, float] = {"n^-1/2": RATE_PARAMETRIC, "n^-1/4": RATE_OVERSPECIFIED}
#: what a reader calls each structure: the joint hypernetwork (HoRA) and per-head adapters (MH-LoRA)
STRUCTURE_LABELS: dict[str, str] = {"shared": "HoRA (shared)", "nonshared": "MH-LoRA (non-shared)"}
#: one colour per structure in every figure
_STRUCTURE_COLORS: dict[str, str] = {"shared": "C0", "nonshared": "C3"}


def series_labels(names: list[str], structures: dict[str, str] | None = None) -> dict[str, str]:
    """Legend label per series: :data:`STRUCTURE_LABELS` of its structure, with the series name when
    several series share a structure (e.g. H = 2 and H = 4); the name itself for other series."""
    structures = structures or {}
    kinds = [structures.get(n, "") for n in names]
    out = {}
    for name, kind in zip(names, kinds, strict=True):
        label = STRUCTURE_LABELS.get(kind)
        out[name] = name if label is None else (label if kinds.count(kind) == 1 else f"{label}, {name}")
    return out


def _series_color(kind: str, index: int) -> str:
    return _STRUCTURE_COLORS.get(kind, f"C{index}")


def plot_rate_axes(ax: plt.Axes, summary, rates, loss: str, *, series: list[str] | None = None,
                   references: dict[str, float] | None = None, control_ax: plt.Axes | None = None,
                   legend: bool = True, structures: dict[str, str] | None = None) -> None:
    """Draw one loss's convergence plot on ``ax`` (log-log).

    Parameters
    ----------
    ax : matplotlib Axes
    summary : pandas.DataFrame
        Per (series, n) statistics with columns ``series, n, <loss>_mean, <loss>_sd``
        (``hmoe_sim.sweep.report.summary_table``).
    rates : pandas.DataFrame
        Per (series, loss) fits with ``slope, ci_low, ci_high, intercept`` (``rates.csv``).
    loss : str
        Loss column to draw (``D1``, ``D2``, ``L2``).
    series : list of str, optional
        Series to overlay (default: all in ``summary`` order).
    references : dict of str to float, optional
        Dashed reference slopes (default :data:`REFERENCE_SLOPES`), anchored at the first
        plotted mean.
    control_ax : matplotlib Axes, optional
        Where the noise-free controls go (their own axes, so that controls at round-off do not
        squeeze the data into the top of the panel); default ``ax``.
    legend : bool, default True
        Draw a legend on ``ax`` (``False`` when the caller puts one legend outside the axes).
    structures : dict of str to str, optional
        Structure of each series: labels :data:`STRUCTURE_LABELS` (:func:`series_labels`).

    Notes
    -----
    Points are means over the usable fits with error bars of +-2 SD; a lower bar that
    would cross zero is cut at a tenth of the mean (log axes). The solid line is the fitted
    ``exp(intercept) n^slope``, labelled with the slope and its CI, and with the sensitivity
    slope over the fits strictly inside the parameter box (``slope_inside``) when that set differs.
    """
    if "control" in summary:
        controls = summary[summary["control"].fillna("") == "noise_free"]
        summary = summary[summary["control"].fillna("") == ""]
    else:
        controls = summary.iloc[0:0]
    names = list(dict.fromkeys(summary["series"])) if series is None else list(series)
    labels = series_labels(names, structures)
    refs = REFERENCE_SLOPES if references is None else references
    anchor: tuple[float, float] | None = None
    for i, name in enumerate(names):
        color = f"C{i}"
        part = summary[summary["series"] == name].sort_values("n")
        n = part["n"].to_numpy(dtype=float)
        mean = part[f"{loss}_mean"].to_numpy(dtype=float)
        sd = np.nan_to_num(part[f"{loss}_sd"].to_numpy(dtype=float))
        keep = np.isfinite(mean) & (mean > 0)
        if not keep.any():
            continue
        n, mean, sd = n[keep], mean[keep], sd[keep]
        lower = np.minimum(2 * sd, 0.9 * mean)
        ax.errorbar(n, mean, yerr=[lower, 2 * sd], fmt="o", color=color, capsize=3, ms=4)
        if anchor is None:
            anchor = (n[0], mean[0])
        row = rates[(rates["series"] == name) & (rates["loss"] == loss)]
        if len(row) and np.isfinite(float(row["slope"].iloc[0])):
            r = row.iloc[0]
            grid = np.geomspace(n.min(), n.max(), 50)
            label = f"{labels[name]}: slope {r['slope']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
            if "verdict" in r:
                label += f" ({r['verdict']})"
            inside = float(r.get("slope_inside", np.nan))
            if np.isfinite(inside) and int(r.get("n_used_inside", 0)) != int(r.get("n_used", 0)):
                label += f"\n  (fits inside the box only: {inside:+.3f}, {int(r['n_used_inside'])} fits)"
            ax.plot(grid, np.exp(float(r["intercept"])) * grid ** float(r["slope"]), "-", color=color, label=label)
        else:
            ax.plot([], [], "o", color=color, label=f"{labels[name]}: no slope")
        _draw_control(ax if control_ax is None else control_ax, controls[controls["series"] == name].sort_values("n"),
                      loss, color, labels[name], faint=control_ax is None)
    if anchor is not None:
        grid = np.geomspace(summary["n"].min(), summary["n"].max(), 50)
        for j, (text, slope) in enumerate(refs.items()):
            ax.plot(grid, anchor[1] * (grid / anchor[0]) ** slope, "--", color="0.5", lw=1,
                    dashes=(4, 2 + 2 * j), label=f"reference {text}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sample size n")
    ax.set_ylabel(f"{loss} (mean, +-2 SD)" + ("; faint: noise-free control median" if control_ax is None else ""))
    ax.grid(True, which="both", alpha=0.25)
    if control_ax is not None:
        control_ax.set_xscale("log")
        control_ax.set_yscale("log")
        control_ax.set_xlabel("sample size n")
        control_ax.set_ylabel(f"{loss}, noise-free control (median)")
        control_ax.grid(True, which="both", alpha=0.25)
    if legend:
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def _draw_control(ax: plt.Axes, part, loss: str, color: str, name: str, *, faint: bool = True) -> None:
    """The noise-free control of a series: its median loss per n (faint when beside the series)."""
    if part.empty:
        return
    n = part["n"].to_numpy(dtype=float)
    med = part[f"{loss}_median"].to_numpy(dtype=float)
    keep = np.isfinite(med) & (med > 0)
    if keep.any():
        ax.plot(n[keep], med[keep], "s:", color=color, alpha=0.4 if faint else 1.0, ms=3, lw=1,
                label=f"{name}, noise-free control (median)")


def _one_axis(table, axis: str | None):
    """The rows of ``table`` on ``axis`` (default: ``"n_eff"`` when present, else ``"n"``) and the axis."""
    if table is None or "axis" not in table:
        return table, "n" if axis is None else axis
    present = list(dict.fromkeys(table["axis"]))
    chosen = ("n_eff" if "n_eff" in present else "n") if axis is None else axis
    if chosen not in present:
        raise ValueError(f"axis {chosen!r} is not in the table (it has {present})")
    return table[table["axis"] == chosen], chosen


#: axis label of each rate axis
_AXIS_TEXT = {"n": "n", "n_eff": "n/σ²"}


def plot_forest(per_truth, losses: list[str], *, title: str | None = None, ensemble=None, upper: bool = False,
                axis: str | None = None) -> plt.Figure:
    """Forest plot of a truth ensemble: per truth, each series' slope with its CI.

    Parameters
    ----------
    per_truth : pandas.DataFrame
        ``per_truth.csv`` (:func:`hmoe_sim.sweep.ensemble.per_truth_table`): columns ``truth, H,
        series, loss, slope, ci_low, ci_high, verdict``.
    losses : list of str
        One panel column per loss; one panel row per ``H``.
    ensemble : pandas.DataFrame, optional
        ``ensemble.csv`` (:func:`hmoe_sim.sweep.ensemble.ensemble_table`): when it has the
        ensemble slopes, a last row "all truths" shows each structure's ensemble slope (one
        slope, one intercept per truth) with its CI, as diamonds.

    When ``per_truth`` has ``paired_diff`` (from the per-fit results), a last column shows, for
    the first loss, the paired difference of log loss (shared minus non-shared) at the largest
    n per truth, and its median over truths from ``ensemble``.

    upper : bool, default False
        Draw the slopes over the upper half of the axis (``slope_upper, ci_low_upper,
        ci_high_upper``; the pooled row from ``{shared,nonshared}_ensemble_slope_upper``).
    axis : str, optional
        ``"n"`` or ``"n_eff"``: the rows of that axis when the tables have an ``axis`` column
        (default ``"n_eff"`` when present, else ``"n"``).

    Notes
    -----
    Filled markers: verdict ``rate``; open markers: any other verdict (named in the legend).
    The dashed line is the parametric reference ``-1/2``. Series are labelled by structure
    (:data:`STRUCTURE_LABELS`).
    """
    per_truth, axis = _one_axis(per_truth, axis)
    ensemble, _ = _one_axis(ensemble, axis)
    suffix = "_upper" if upper else ""
    heads = sorted(per_truth["H"].unique())
    paired = "paired_diff" in per_truth and bool(np.isfinite(per_truth["paired_diff"].to_numpy(dtype=float)).any())
    n_cols = len(losses) + int(paired)
    fig, axes = plt.subplots(len(heads), n_cols, figsize=(4.6 * n_cols, 0.5 + 0.42 *
                             max(per_truth.groupby("H")["truth"].nunique().max(), 2) * len(heads) + 1.2),
                             layout="constrained", squeeze=False)
    if paired:
        for row, h in enumerate(heads):
            _draw_paired(axes[row][-1], per_truth[per_truth["H"] == h], losses[0], h, ensemble)
    names = list(dict.fromkeys(per_truth["series"]))
    kinds = dict(zip(per_truth["series"], per_truth["structure"], strict=True)) if "structure" in per_truth else {}
    for row, h in enumerate(heads):
        for col, loss in enumerate(losses):
            ax = axes[row][col]
            part = per_truth[(per_truth["H"] == h) & (per_truth["loss"] == loss)]
            truths = sorted(part["truth"].unique())
            present = [nm for nm in names if (part["series"] == nm).any()]
            for j, name in enumerate(present):
                sub = part[part["series"] == name].set_index("truth")
                kind = str(kinds.get(name, ""))
                color = _series_color(kind, j)
                label = series_labels(present, kinds)[name]
                for k, t in enumerate(truths):
                    if t not in sub.index:
                        continue
                    r = sub.loc[t]
                    y = k + (j - (len(present) - 1) / 2) * 0.22
                    filled = r["verdict"] == "rate"
                    slope, lo, hi = (float(r[f"{c}{suffix}"]) for c in ("slope", "ci_low", "ci_high"))
                    ax.errorbar([slope], [y], xerr=[[slope - lo], [hi - slope]],
                                fmt="o", color=color, mfc=color if filled else "white", capsize=2, ms=5,
                                label=label if k == 0 else None)
            ens = None if ensemble is None or f"shared_ensemble_slope{suffix}" not in ensemble else \
                ensemble[(ensemble["H"] == h) & (ensemble["loss"] == loss)]
            if ens is not None and len(ens):
                e = ens.iloc[0]
                for j, kind in enumerate(("shared", "nonshared")):
                    slope, lo, hi = (float(e[f"{kind}_ensemble_{c}{suffix}"]) for c in ("slope", "ci_low", "ci_high"))
                    if np.isfinite(slope):
                        y = len(truths) + 0.4 + (j - 0.5) * 0.22
                        ax.errorbar([slope], [y], xerr=[[slope - lo], [hi - slope]], fmt="D",
                                    color=_STRUCTURE_COLORS[kind], capsize=2, ms=5)
                truths = [*truths, "all"]
            ax.axvline(-0.5, ls="--", color="0.5", lw=1)
            ax.axvline(0.0, ls="-", color="0.8", lw=1)
            ax.set_yticks([k + (0.4 if t == "all" else 0.0) for k, t in enumerate(truths)])
            ax.set_yticklabels([("all truths (ensemble slope)" if t == "all" else f"truth {t}") for t in truths])
            ax.invert_yaxis()
            ax.set_xlabel(f"slope of log {loss} on log {_AXIS_TEXT.get(axis, axis)}"
                          + (", upper half of the axis" if upper else "") + " (95% CI)")
            ax.set_title(f"{loss}, H = {h}")
            ax.grid(True, axis="x", alpha=0.25)
            if row == 0 and col == 0:
                handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=7,
               title="open marker: verdict not 'rate'; diamond: one slope over all truths", title_fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def _draw_paired(ax: plt.Axes, part, loss: str, h: int, ensemble) -> None:
    """Per truth: log loss of shared minus non-shared at the largest n (paired), with its CI."""
    rows = part[(part["loss"] == loss) & (part["structure"] == "shared")].sort_values("truth")
    at = _AXIS_TEXT.get(str(part["axis"].iloc[0]), "n") if "axis" in part and len(part) else "n"
    truths = rows["truth"].tolist()
    for k, r in enumerate(rows.itertuples()):
        if np.isfinite(r.paired_diff):
            ax.errorbar([r.paired_diff], [k], xerr=[[r.paired_diff - r.paired_diff_ci_low],
                        [r.paired_diff_ci_high - r.paired_diff]], fmt="o", color="0.2", capsize=2, ms=5)
    labels = [f"truth {t}" for t in truths]
    if ensemble is not None and "largest_n_diff_median" in ensemble:
        e = ensemble[(ensemble["H"] == h) & (ensemble["loss"] == loss)]
        if len(e) and np.isfinite(float(e["largest_n_diff_median"].iloc[0])):
            med, lo, hi = (float(e[c].iloc[0]) for c in ("largest_n_diff_median", "largest_n_diff_ci_low",
                                                          "largest_n_diff_ci_high"))
            ax.errorbar([med], [len(truths) + 0.4], xerr=[[med - lo], [hi - med]], fmt="D", color="0.2",
                        capsize=2, ms=5)
            labels.append("median over truths")
    ax.set_yticks([k + (0.4 if k == len(truths) else 0.0) for k in range(len(labels))])
    ax.set_yticklabels(labels)
    ax.invert_yaxis()
    ax.axvline(0.0, ls="-", color="0.6", lw=1)
    ax.set_xlabel(f"log {loss}, shared - non-shared,\npaired by data set (95% CI)")
    ax.set_title(f"{loss}, H = {h}, at the largest {at}")
    ax.grid(True, axis="x", alpha=0.25)


def plot_rate_panels(summary, rates, losses: list[str], *, series: list[str] | None = None,
                     references: dict[str, float] | None = None, title: str | None = None,
                     structures: dict[str, str] | None = None) -> plt.Figure:
    """One log-log column per loss, all series overlaid (e.g. shared vs non-shared).

    The top row holds the noisy data, the bottom row (when ``summary`` has noise-free
    controls) the controls in their own axes; each column's legend sits under it, outside the
    axes. See :func:`plot_rate_axes` for the arguments; returns the ``Figure``.
    """
    if not losses:
        raise ValueError("losses must name at least one loss column")
    has_controls = "control" in summary and bool((summary["control"].fillna("") == "noise_free").any())
    rows = 2 if has_controls else 1
    fig, axes = plt.subplots(rows, len(losses), figsize=(5.4 * len(losses), 4.2 + 2.6 * (rows - 1) + 1.6),
                             layout="constrained", squeeze=False, sharex="col",
                             height_ratios=[3, 2][:rows])
    for col, loss in enumerate(losses):
        ax = axes[0][col]
        plot_rate_axes(ax, summary, rates, loss, series=series, references=references,
                       control_ax=axes[1][col] if has_controls else None, legend=False, structures=structures)
        ax.set_title(loss)
        if has_controls:
            ax.set_xlabel("")
        handles, labels = ax.get_legend_handles_labels()
        if has_controls:
            more = axes[1][col].get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        axes[-1][col].legend(handles, labels, fontsize=6.5, loc="upper left", bbox_to_anchor=(0.0, -0.22),
                             borderaxespad=0.0)
    if title:
        fig.suptitle(title)
    return fig


#: markers of the sample sizes in the n_eff figure, smallest n first
_SIZE_MARKERS = ("o", "s", "^", "D", "v", "P")


def plot_neff_axes(ax: plt.Axes, summary, rates, loss: str, *, structures: dict[str, str] | None = None,
                   series: list[str] | None = None) -> None:
    """Draw one loss against the effective sample size ``n/sigma^2`` on ``ax`` (log-log).

    Parameters
    ----------
    ax : matplotlib Axes
    summary : pandas.DataFrame
        ``summary.csv`` of a run with a noise ladder: per (series, control, n, noise level) with
        ``n_eff`` and ``<loss>_median`` (:func:`hmoe_sim.sweep.report.summary_table`).
    rates : pandas.DataFrame
        ``rates.csv`` with its ``axis = "n_eff"`` rows (``slope, ci_low, ci_high, intercept,
        slope_upper, ci_low_upper, ci_high_upper, verdict``).
    loss : str
        Loss column to draw.
    structures : dict of str to str, optional
        Structure (``"shared"``/``"nonshared"``) of each series, for the labels and colours.
    series : list of str, optional
        Series to draw (default: every series of ``summary``).

    Notes
    -----
    One colour per series, one marker per sample size (a thin line joins the noise levels of
    a size), so that two sizes at the same ``n/sigma^2`` sit on top of each other when the loss
    depends on ``n/sigma^2`` alone. The solid line is the fitted power law on ``n_eff``, labelled
    with its slope, the upper-half slope and the verdict; the dashed line the reference ``-1/2``
    through the first series' leftmost point. The noise-free control (sigma = 0, ``n_eff`` =
    infinity) is drawn at the right edge, one hollow marker per size; a control below the data's
    range by more than a factor 100 (round-off) sits on the bottom edge as a downward triangle
    with its value written beside it.
    """
    control = summary["control"].fillna("").astype(str) if "control" in summary else \
        np.full(len(summary), "")
    noisy = summary[control == ""]
    controls = summary[control == "noise_free"]
    names = list(dict.fromkeys(noisy["series"])) if series is None else list(series)
    structures = structures or {}
    labels = series_labels(names, structures)
    sizes = sorted(noisy["n"].unique())
    marker = {n: _SIZE_MARKERS[i % len(_SIZE_MARKERS)] for i, n in enumerate(sizes)}
    column = f"{loss}_median"
    finite = noisy[np.isfinite(noisy[column].to_numpy(dtype=float)) & (noisy[column] > 0)]
    if finite.empty:
        ax.text(0.5, 0.5, f"no finite {loss}", transform=ax.transAxes, ha="center")
        return
    x_max = float(finite["n_eff"].max())
    edge = x_max * 10 ** 0.8
    floor = float(finite[column].min()) / 100.0
    anchor: tuple[float, float] | None = None
    for i, name in enumerate(names):
        color = _series_color(structures.get(name, ""), i)
        part = finite[finite["series"] == name]
        for n in sizes:
            cur = part[part["n"] == n].sort_values("n_eff")
            if cur.empty:
                continue
            ax.plot(cur["n_eff"], cur[column], marker=marker[n], ls="-", lw=0.6, color=color, ms=5, alpha=0.9)
            if anchor is None:
                anchor = (float(cur["n_eff"].iloc[0]), float(cur[column].iloc[0]))
        row = rates[(rates["series"] == name) & (rates["loss"] == loss)]
        if "axis" in row:
            row = row[row["axis"] == "n_eff"]
        label = labels[name]
        if len(row) and np.isfinite(float(row["slope"].iloc[0])):
            r = row.iloc[0]
            grid = np.geomspace(float(part["n_eff"].min()), float(part["n_eff"].max()), 50)
            label += f": slope {r['slope']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
            if np.isfinite(float(r.get("slope_upper", np.nan))):
                label += f"\n  upper half {r['slope_upper']:+.2f} [{r['ci_low_upper']:+.2f}, {r['ci_high_upper']:+.2f}]"
            if "verdict" in r:
                label += f" ({r['verdict']})"
            ax.plot(grid, np.exp(float(r["intercept"])) * grid ** float(r["slope"]), "-", color=color, lw=1.6,
                    label=label)
        else:
            ax.plot([], [], "-", color=color, label=f"{label}: no slope on n/σ²")
        mine = controls[controls["series"] == name]
        below = []
        for n in sizes:
            level = mine.loc[mine["n"] == n, column].to_numpy(dtype=float)
            level = level[np.isfinite(level)]
            if not level.size:
                continue
            value = float(np.median(level))
            ax.plot([edge], [max(value, floor)], marker="v" if value < floor else marker[n], mfc="white",
                    color=color, ms=6, ls="none")
            if value < floor:
                below.append(f"{value:.0e}")
        if below:  # one note per series: the round-off levels of its sizes, smallest n first
            ax.annotate(" | ".join(below), (edge, floor), xytext=(-4, 9 + 8 * i), textcoords="offset points",
                        fontsize=6, color=color, ha="right", va="center")
    if anchor is not None:
        grid = np.geomspace(float(finite["n_eff"].min()), x_max, 50)
        ax.plot(grid, anchor[1] * (grid / anchor[0]) ** RATE_PARAMETRIC, "--", color="0.45", lw=1,
                label="reference (n/σ²)^-1/2")
    if len(controls):
        ax.axvline(x_max * 10 ** 0.4, color="0.75", lw=0.8, ls=":")
        ax.plot([], [], "s", mfc="white", color="0.4", ls="none",
                label="hollow, right edge: noise-free control (σ = 0), median per size;\n"
                      "  triangle: below the panel (round-off), its values written beside it")
    for n in sizes:
        ax.plot([], [], marker=marker[n], color="0.3", ls="-", lw=0.6, label=f"n = {n:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [t for t in ax.get_xticks() if float(finite["n_eff"].min()) / 3 <= t <= x_max * 10 ** 0.2]
    if len(controls):
        ax.set_xticks([*ticks, edge], [*(f"$10^{{{np.log10(t):.0f}}}$" for t in ticks), "σ = 0"])
        ax.set_xlim(float(finite["n_eff"].min()) / 3, edge * 3)
    ax.set_xlabel("effective sample size n/σ²")
    ax.set_ylabel(f"{loss} (median over replications)")
    ax.grid(True, which="major", alpha=0.25)


def plot_neff_panels(summary, rates, losses: list[str], *, structures: dict[str, str] | None = None,
                     series: list[str] | None = None, title: str | None = None) -> plt.Figure:
    """One log-log column per loss against ``n/sigma^2`` (:func:`plot_neff_axes`), one row per truth.

    ``summary`` and ``rates`` may hold several truths (column ``truth``): each gets its row of
    panels. Legends sit outside the axes: under the panel for one truth, to its right for several.
    Returns the ``Figure``.
    """
    if not losses:
        raise ValueError("losses must name at least one loss column")
    if "n_eff" not in summary:
        raise ValueError("summary has no n_eff column: draw a run without a noise ladder with plot_rate_panels")
    truths = sorted(summary["truth"].unique()) if "truth" in summary else [None]
    many = len(truths) > 1
    fig, axes = plt.subplots(len(truths), len(losses), figsize=((5.4 + 3.4 * many) * len(losses),
                                                                 6.4 if not many else 3.6 * len(truths)),
                             layout="constrained", squeeze=False)
    for row, truth in enumerate(truths):
        part = summary if truth is None else summary[summary["truth"] == truth]
        fitted = rates if truth is None or "truth" not in rates else rates[rates["truth"] == truth]
        for col, loss in enumerate(losses):
            ax = axes[row][col]
            plot_neff_axes(ax, part, fitted, loss, structures=structures, series=series)
            ax.set_title(loss if truth is None else f"{loss}, truth {truth}")
            if many:
                ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
            else:
                ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(0.0, -0.14), borderaxespad=0.0)
    if title:
        fig.suptitle(title)
    return fig
