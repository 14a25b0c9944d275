"""Figures of the fine-tuning experiments (:mod:`hmoe_sim.plotting`)."""

from __future__ import annotations

import matplotlib.pyplot as plt

__all__ = ["plot_finetune_sample_efficiency", "plot_finetune_pretrained"]


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
