"""All plotting of hmoe-sim (the only module that imports matplotlib).

Functions take tables (pandas DataFrames) or arrays computed elsewhere and return the
matplotlib ``Figure``; saving is the caller's choice (``fig.savefig(path)``). The
non-interactive Agg backend is selected so that plotting works on headless machines.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hmoe_sim.rates import RATE_OVERSPECIFIED, RATE_PARAMETRIC  # noqa: E402

__all__ = [
    "REFERENCE_SLOPES",
    "plot_finetune_pretrained",
    "plot_finetune_sample_efficiency",
    "plot_forest",
    "plot_inverse_bound",
    "plot_rate_axes",
    "plot_rate_panels",
    "plot_sample_complexity",
]


# ---------------------------------------------------------------------- convergence rates (sweeps)

#: theorem reference slopes drawn dashed: parametric n^-1/2 and over-specified atoms n^-1/4
REFERENCE_SLOPES: dict[str, float] = {"n^-1/2": RATE_PARAMETRIC, "n^-1/4": RATE_OVERSPECIFIED}


def plot_rate_axes(ax: plt.Axes, summary, rates, loss: str, *, series: list[str] | None = None,
                   references: dict[str, float] | None = None, control_ax: plt.Axes | None = None,
                   legend: bool = True) -> None:
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
            label = f"{name}: slope {r['slope']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"
            if "verdict" in r:
                label += f" ({r['verdict']})"
            inside = float(r.get("slope_inside", np.nan))
            if np.isfinite(inside) and int(r.get("n_used_inside", 0)) != int(r.get("n_used", 0)):
                label += f"\n  (fits inside the box only: {inside:+.3f}, {int(r['n_used_inside'])} fits)"
            ax.plot(grid, np.exp(float(r["intercept"])) * grid ** float(r["slope"]), "-", color=color, label=label)
        else:
            ax.plot([], [], "o", color=color, label=f"{name}: no slope")
        _draw_control(ax if control_ax is None else control_ax, controls[controls["series"] == name].sort_values("n"),
                      loss, color, name, faint=control_ax is None)
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


def plot_forest(per_truth, losses: list[str], *, title: str | None = None, ensemble=None) -> plt.Figure:
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

    Notes
    -----
    Filled markers: verdict ``rate``; open markers: any other verdict (named in the legend).
    The dashed line is the parametric reference ``-1/2``.
    """
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
    for row, h in enumerate(heads):
        for col, loss in enumerate(losses):
            ax = axes[row][col]
            part = per_truth[(per_truth["H"] == h) & (per_truth["loss"] == loss)]
            truths = sorted(part["truth"].unique())
            present = [nm for nm in names if (part["series"] == nm).any()]
            for j, name in enumerate(present):
                sub = part[part["series"] == name].set_index("truth")
                kind = str(sub["structure"].iloc[0]) if "structure" in sub and len(sub) else ""
                color = {"shared": "C0", "nonshared": "C3"}.get(kind, f"C{j}")
                for k, t in enumerate(truths):
                    if t not in sub.index:
                        continue
                    r = sub.loc[t]
                    y = k + (j - (len(present) - 1) / 2) * 0.22
                    filled = r["verdict"] == "rate"
                    ax.errorbar([r["slope"]], [y], xerr=[[r["slope"] - r["ci_low"]], [r["ci_high"] - r["slope"]]],
                                fmt="o", color=color, mfc=color if filled else "white", capsize=2, ms=5,
                                label=name if k == 0 else None)
            ens = None if ensemble is None or "shared_ensemble_slope" not in ensemble else \
                ensemble[(ensemble["H"] == h) & (ensemble["loss"] == loss)]
            if ens is not None and len(ens):
                e = ens.iloc[0]
                for j, kind in enumerate(("shared", "nonshared")):
                    slope, lo, hi = (float(e[f"{kind}_ensemble_{c}"]) for c in ("slope", "ci_low", "ci_high"))
                    if np.isfinite(slope):
                        y = len(truths) + 0.4 + (j - 0.5) * 0.22
                        ax.errorbar([slope], [y], xerr=[[slope - lo], [hi - slope]], fmt="D",
                                    color={"shared": "C0", "nonshared": "C3"}[kind], capsize=2, ms=5)
                truths = [*truths, "all"]
            ax.axvline(-0.5, ls="--", color="0.5", lw=1)
            ax.axvline(0.0, ls="-", color="0.8", lw=1)
            ax.set_yticks([k + (0.4 if t == "all" else 0.0) for k, t in enumerate(truths)])
            ax.set_yticklabels([("all truths (ensemble slope)" if t == "all" else f"truth {t}") for t in truths])
            ax.invert_yaxis()
            ax.set_xlabel(f"slope of log {loss} on log n (95% CI)")
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
    ax.set_xlabel(f"log {loss}, shared - non-shared (95% CI)")
    ax.set_title(f"{loss} at the largest n, H = {h}, paired")
    ax.grid(True, axis="x", alpha=0.25)


def plot_rate_panels(summary, rates, losses: list[str], *, series: list[str] | None = None,
                     references: dict[str, float] | None = None, title: str | None = None) -> plt.Figure:
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
                       control_ax=axes[1][col] if has_controls else None, legend=False)
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


# ---------------------------------------------------------------------- inverse-bound check


def plot_inverse_bound(table, *, losses: tuple[tuple[str, float], ...] = (("D1", 1.0), ("D1", 2.0), ("D2", 1.0),
                                                                          ("D2", 2.0))) -> plt.Figure:
    """Log-log panels of ``rho(eps) = ||f_eps - f*|| / D`` against ``eps``, one per (loss, r).

    Parameters
    ----------
    table : pandas.DataFrame
        Columns ``model, loss, r, eps, rho`` (``hmoe_sim.theory_checks.inverse_bound_table``).
    losses : tuple of (str, float)
        The ``(loss, r)`` panels to draw; ``D1`` on the sequence of exponent ``r``.

    Notes
    -----
    A curve that falls to zero with ``eps`` is the slow-rate mechanism of the minimax
    lower bound; a curve bounded away from zero is what a polynomial rate needs. The dotted
    grey line of slope 1 is a guide for ``rho ~ eps``. Rows with ``kink_points == 0`` (ReLU
    experts, kink band empty in the evaluation sample) are drawn as crosses, off the line.
    """
    fig, axes = plt.subplots(1, len(losses), figsize=(4.2 * len(losses), 4.2), layout="constrained",
                             sharey=True, squeeze=False)
    models = list(dict.fromkeys(table["model"]))
    for ax, (kind, r) in zip(axes[0], losses, strict=True):
        sub = table[(table["loss"] == kind) & (table["r"] == r)]
        for name in models:
            cur = sub[sub["model"] == name].sort_values("eps")
            blind = cur["kink_points"].eq(0) if "kink_points" in cur else cur["eps"].lt(0)
            line = ax.loglog(cur["eps"][~blind], cur["rho"][~blind], marker="o", markersize=3, label=name)[0]
            if blind.any():
                ax.loglog(cur["eps"][blind], cur["rho"][blind], "x", color=line.get_color(), markersize=4,
                          label=f"{name}: kink not sampled")
        eps = np.sort(sub["eps"].unique())
        if eps.size:
            ax.loglog(eps, 0.1 * eps / eps[-1], ":", color="grey", label="slope 1 (rho ~ eps)")
        ax.set_title(f"{kind}" + (f"  (sequence r={r:g})" if kind == "D1" else f", r={r:g}"))
        ax.set_xlabel("eps")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("||f_eps - f*||_L2 / D(G_eps, G*)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    return fig


def plot_sample_complexity(table, *, reference_exponent: float = 2.0) -> plt.Figure:
    """Log-log ``n*(eps)`` against ``D1(G_eps, G*)`` (top row) and against ``eps`` (bottom row).

    Parameters
    ----------
    table : pandas.DataFrame
        Columns ``model, sequence, eps, D1, n_star`` (``hmoe_sim.sample_complexity.sample_complexity_table``);
        one column of panels per model, one curve per sequence.
    reference_exponent : float
        The dashed reference ``C D1^-p`` (top row) and its image ``C eps^-2p`` (bottom row, ``D1 ~ eps^2``),
        drawn through the first point of the model's first sequence: ``p = 2`` is the polynomial
        bound ``n* <~ C D1^-2`` that ``||f_eps - f*|| >~ D1`` gives.

    Notes
    -----
    A sequence whose ``n*`` is infinite (``||f_eps - f*|| = 0`` exactly: the exact flat family)
    has no point: upward arrows at the top of the panel mark its ``D1`` (or ``eps``) values,
    and the legend says ``n* = inf``.
    """
    from matplotlib.transforms import blended_transform_factory

    models = list(dict.fromkeys(table["model"]))
    sequences = list(dict.fromkeys(table["sequence"]))
    colors = {name: f"C{i}" for i, name in enumerate(sequences)}
    fig, axes = plt.subplots(2, len(models), figsize=(3.7 * len(models), 7.6), layout="constrained", squeeze=False)
    for col, model in enumerate(models):
        sub = table[table["model"] == model]
        for row, (against, label) in enumerate((("D1", "D1(G_eps, G*)"), ("eps", "eps"))):
            ax = axes[row][col]
            top = blended_transform_factory(ax.transData, ax.transAxes)
            anchor: tuple[float, float] | None = None
            for name in sequences:
                cur = sub[sub["sequence"] == name].sort_values("eps", ascending=False)
                if cur.empty:
                    continue
                x = cur[against].to_numpy(dtype=float)
                n_star = cur["n_star"].to_numpy(dtype=float)
                finite = np.isfinite(n_star)
                if finite.any():
                    ax.loglog(x[finite], n_star[finite], marker="o", markersize=2.5, lw=1.2, color=colors[name],
                              label=name)
                    if anchor is None:
                        anchor = (x[finite][0], n_star[finite][0])
                if (~finite).any():
                    for xi in x[~finite][::4]:
                        ax.annotate("", xy=(xi, 0.99), xytext=(xi, 0.88), xycoords=top, textcoords=top,
                                    arrowprops=dict(arrowstyle="->", color=colors[name], lw=1.2))
                    ax.plot([], [], marker=r"$\uparrow$", ls="", color=colors[name],
                            label=f"{name}: n* = inf, exact flat family (arrows)")
            if anchor is not None:
                xs = np.sort(sub[against].to_numpy(dtype=float))
                xs = xs[np.isfinite(xs) & (xs > 0)]
                slope = reference_exponent if against == "D1" else 2 * reference_exponent
                ax.loglog(xs, anchor[1] * (xs / anchor[0]) ** (-slope), "--", color="k", lw=0.9, zorder=5,
                          label=f"C {label.split('(')[0]}^-{slope:g}")
            ax.set_xlabel(label)
            ax.grid(True, which="major", alpha=0.3)
            if row == 0:
                ax.set_title(model, fontsize=9)
            if col == 0:
                ax.set_ylabel("n* = sigma^2 z / ||f_eps - f*||^2")
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(text, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=len(handles), fontsize=8)
    if {"z", "noise_std"} <= set(table.columns):
        fig.suptitle(f"two-point sample size n* = sigma^2 z / ||f_eps - f*||^2_L2 along the inverse-bound sequences "
                     f"(z = {table['z'].iloc[0]:.2f}, sigma = {table['noise_std'].iloc[0]:g})", fontsize=10)
    return fig


# ---------------------------------------------------------------------- fine-tuning sample efficiency (hora)


def plot_finetune_sample_efficiency(table, *, metric: str = "test_mse") -> plt.Figure:
    """Test error against training-set size, one panel per teacher (log-log).

    Parameters
    ----------
    table : pandas.DataFrame
        One row per fit with columns ``teacher, label, n_params, n, <metric>`` (the output of
        :func:`hmoe_sim.finetune.sample_efficiency.run_sample_efficiency`).
    metric : str
        Column to plot (``"test_mse"`` or ``"relative_test_error"``).

    Returns
    -------
    matplotlib.figure.Figure
        Mean over replicates with +-2 standard errors; the legend gives each student's
        trainable-parameter count. Non-finite values are dropped and the count kept per point.
    """
    teachers = list(dict.fromkeys(table["teacher"]))
    fig, axes = plt.subplots(1, len(teachers), figsize=(5.0 * len(teachers), 4.2), layout="constrained",
                             squeeze=False, sharey=True)
    for ax, teacher in zip(axes[0], teachers, strict=True):
        sub = table[(table["teacher"] == teacher) & table[metric].notna()]
        for label, group in sub.groupby("label", sort=False):
            stats = group.groupby("n")[metric].agg(["mean", "std", "count"]).reset_index()
            se = stats["std"].fillna(0.0) / stats["count"] ** 0.5
            lower = (stats["mean"] - 2 * se).clip(lower=stats["mean"] * 1e-3)
            params = int(group["n_params"].iloc[0])
            ax.errorbar(stats["n"], stats["mean"], yerr=[stats["mean"] - lower, 2 * se], marker="o", capsize=3,
                        label=f"{label}: {params} params")
        base = sub["base_test_mse"].iloc[0] if metric == "test_mse" and "base_test_mse" in sub and len(sub) else None
        if base is not None:
            ax.axhline(base, color="grey", linestyle=":", label="frozen base (no adapter)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training examples n")
        ax.set_title(f"teacher: {teacher}")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(metric.replace("_", " ") + " (mean +- 2 SE)")
    return fig


def plot_finetune_pretrained(summary, paired) -> plt.Figure:
    """Test MSE per student and paired differences to HoRA against training sentences, per teacher (log x).

    Parameters
    ----------
    summary : pandas.DataFrame
        Per (teacher, student, n) with columns ``teacher, label, n_params, n, n_seeds, test_mse,
        test_mse_ci_low, test_mse_ci_high, base_test_mse, converged``
        (:func:`hmoe_sim.finetune.pretrained_report.summary_table`).
    paired : pandas.DataFrame
        Per (teacher, n, comparison) with ``mean_diff, ci_low, ci_high``
        (:func:`hmoe_sim.finetune.pretrained_report.paired_differences`).

    Returns
    -------
    matplotlib.figure.Figure
        Top row: mean test MSE over seeds (log scale) with its bootstrap CI as a band, the legend
        giving each student's trainable-parameter count and the dotted line the frozen model; where
        ``summary`` has the optimiser-check columns
        (:func:`hmoe_sim.finetune.pretrained_report.with_optimiser_columns`), crosses mark the polished
        Adam fits' and stars the polished oracle starts' mean test MSE (the oracle's Adam fit keeps
        the teacher, test MSE 0, which a log axis cannot show);
        bottom row: the mean paired difference (HoRA minus each other student) with its CI band
        and the zero line (below zero: HoRA is closer to the teacher). One column per teacher.
    """
    teachers = list(dict.fromkeys(summary["teacher"]))
    fig, axes = plt.subplots(2, len(teachers), figsize=(5.2 * len(teachers), 7.6), layout="constrained",
                             squeeze=False, sharex=True)
    for col, teacher in enumerate(teachers):
        sub = summary[summary["teacher"] == teacher]
        ax = axes[0][col]
        for i, (label, group) in enumerate(sub.groupby("label", sort=False)):
            group = group.sort_values("n")
            color = f"C{i}"
            seeds = f"{int(group['n_seeds'].min())}-{int(group['n_seeds'].max())}"
            ax.plot(group["n"], group["test_mse"], "o-", color=color,
                    label=f"{label}: {int(group['n_params'].iloc[0])} params ({seeds} seeds, "
                          f"{group['converged'].mean():.0%} conv.)")
            ax.fill_between(group["n"], group["test_mse_ci_low"], group["test_mse_ci_high"], color=color, alpha=0.2)
            checks = (("polish_test_mse", "x", "Adam fit polished"), ("oracle_polish_test_mse", "*", "oracle polished"))
            for column, marker, what in checks:
                if column in group and group[column].notna().any():
                    ax.plot(group["n"], group[column], marker, color=color, markersize=8, linestyle="none",
                            label=f"{label}: {what} ({int(group['check_seeds'].max())} seed(s))")
        ax.axhline(float(sub["base_test_mse"].iloc[0]), color="grey", linestyle=":", label="frozen MiniLM")
        ax.set_yscale("log")
        ax.set_title(f"teacher: {teacher}")
        ax.set_ylabel("test MSE to teacher (mean, 95% CI)")
        ax.legend(fontsize=7, loc="lower left")
        ax = axes[1][col]
        part = paired[paired["teacher"] == teacher]
        for i, (comparison, group) in enumerate(part.groupby("comparison", sort=False)):
            group = group.sort_values("n")
            color = f"C{i + 3}"
            ax.plot(group["n"], group["mean_diff"], "o-", color=color, label=comparison)
            ax.fill_between(group["n"], group["ci_low"], group["ci_high"], color=color, alpha=0.2)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.set_ylabel("paired test-MSE difference (mean, 95% CI)")
        ax.set_xlabel("training sentences n")
        if len(part):
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        grid = sorted(sub["n"].unique())
        ax.set_xticks(grid, [str(int(n)) for n in grid])
        ax.minorticks_off()
    return fig
