"""All plotting of hmoe-sim (the only module that imports matplotlib).

Functions take tables (pandas DataFrames) or arrays computed elsewhere and return the
matplotlib ``Figure``; saving is the caller's choice (``fig.savefig(path)``). The
non-interactive Agg backend is selected so that plotting works on headless machines.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

from hmoe_sim.rates import RATE_OVERSPECIFIED, RATE_PARAMETRIC  # noqa: E402

__all__ = [
    "REFERENCE_SLOPES",
    "plot_finetune_pretrained",
    "plot_finetune_sample_efficiency",
    "plot_inverse_bound",
    "plot_rate_axes",
    "plot_rate_panels",
]


# ---------------------------------------------------------------------- convergence rates (sweeps)

#: theorem reference slopes drawn dashed: parametric n^-1/2 and over-specified atoms n^-1/4
REFERENCE_SLOPES: dict[str, float] = {"n^-1/2": RATE_PARAMETRIC, "n^-1/4": RATE_OVERSPECIFIED}


def plot_rate_axes(ax: plt.Axes, summary, rates, loss: str, *, series: list[str] | None = None,
                   references: dict[str, float] | None = None) -> None:
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

    Notes
    -----
    Points are means over the usable fits with error bars of +-2 SD; a lower bar that
    would cross zero is cut at a tenth of the mean (log axes). The solid line is the fitted
    ``exp(intercept) n^slope``, labelled with the slope and its CI, and with the sensitivity
    slope over the fits strictly inside the parameter box (``slope_inside``) when that set differs.
    """
    import numpy as np

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
            inside = float(r.get("slope_inside", np.nan))
            if np.isfinite(inside) and int(r.get("n_used_inside", 0)) != int(r.get("n_used", 0)):
                label += f"\n  (fits inside the box only: {inside:+.3f}, {int(r['n_used_inside'])} fits)"
            ax.plot(grid, np.exp(float(r["intercept"])) * grid ** float(r["slope"]), "-", color=color, label=label)
        else:
            ax.plot([], [], "o", color=color, label=f"{name}: no slope")
    if anchor is not None:
        grid = np.geomspace(summary["n"].min(), summary["n"].max(), 50)
        for j, (text, slope) in enumerate(refs.items()):
            ax.plot(grid, anchor[1] * (grid / anchor[0]) ** slope, "--", color="0.5", lw=1,
                    dashes=(4, 2 + 2 * j), label=f"reference {text}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sample size n")
    ax.set_ylabel(f"{loss} (mean, +-2 SD)")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="best")


def plot_rate_panels(summary, rates, losses: list[str], *, series: list[str] | None = None,
                     references: dict[str, float] | None = None, title: str | None = None) -> plt.Figure:
    """One log-log panel per loss, all series overlaid (e.g. shared vs non-shared).

    See :func:`plot_rate_axes` for the arguments; returns the ``Figure``.
    """
    if not losses:
        raise ValueError("losses must name at least one loss column")
    fig, axes = plt.subplots(1, len(losses), figsize=(5.2 * len(losses), 4.3), layout="constrained", squeeze=False)
    for ax, loss in zip(axes[0], losses, strict=True):
        plot_rate_axes(ax, summary, rates, loss, series=series, references=references)
        ax.set_title(loss)
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
    import numpy as np

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


# ---------------------------------------------------------------------- fine-tuning sample efficiency (hora)


def plot_finetune_sample_efficiency(table, *, metric: str = "test_mse") -> plt.Figure:
    """Test error against training-set size, one panel per teacher (log-log).

    Parameters
    ----------
    table : pandas.DataFrame
        One row per fit with columns ``teacher, label, n_params, n, <metric>`` (the output of
        :func:`hmoe_sim.hora.finetune.run_sample_efficiency`).
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


def plot_finetune_pretrained(table) -> plt.Figure:
    """Test MSE and cosine similarity to the teacher against training sentences, per teacher (log x).

    Parameters
    ----------
    table : pandas.DataFrame
        One row per fit with columns ``teacher, teacher_shift, label, n_params, n, test_mse,
        base_test_mse, test_cosine, base_test_cosine`` (the output of
        :func:`hmoe_sim.hora.finetune_pretrained.run_pretrained_sample_efficiency`).

    Returns
    -------
    matplotlib.figure.Figure
        Top row: test MSE (log scale); bottom row: mean cosine similarity; one column per
        teacher. Points are means over replicates with +-2 standard errors; the legend gives
        each student's exact trainable-parameter count; the dotted line is the frozen model.
        Non-finite values are dropped.
    """
    teachers = list(dict.fromkeys(table["teacher"]))
    fig, axes = plt.subplots(2, len(teachers), figsize=(5.0 * len(teachers), 7.4), layout="constrained",
                             squeeze=False, sharex=True)
    for col, teacher in enumerate(teachers):
        sub = table[table["teacher"] == teacher]
        for row, (metric, base_column) in enumerate((("test_mse", "base_test_mse"),
                                                     ("test_cosine", "base_test_cosine"))):
            ax = axes[row][col]
            finite = sub[sub[metric].notna() & (sub[metric].abs() < float("inf"))]
            for label, group in finite.groupby("label", sort=False):
                stats = group.groupby("n")[metric].agg(["mean", "std", "count"]).reset_index()
                se = stats["std"].fillna(0.0) / stats["count"] ** 0.5
                lower = 2 * se if metric != "test_mse" else (2 * se).clip(upper=stats["mean"] * 0.999)
                ax.errorbar(stats["n"], stats["mean"], yerr=[lower, 2 * se], marker="o", capsize=3,
                            label=f"{label}: {int(group['n_params'].iloc[0])} params")
            if len(sub):
                ax.axhline(float(sub[base_column].iloc[0]), color="grey", linestyle=":", label="frozen MiniLM")
            ax.set_xscale("log")
            grid = sorted(sub["n"].unique())
            ax.set_xticks(grid, [str(int(n)) for n in grid])
            ax.minorticks_off()
            if metric == "test_mse":
                ax.set_yscale("log")
                shift = float(sub["teacher_shift"].iloc[0]) if len(sub) else float("nan")
                ax.set_title(f"teacher: {teacher} (embedding shift {shift:.2f})")
                ax.legend(fontsize=8)
            else:
                ax.set_xlabel("training sentences n")
        axes[0][col].set_ylabel("test MSE to teacher (mean +- 2 SE)")
        axes[1][col].set_ylabel("cosine similarity to teacher")
    return fig
