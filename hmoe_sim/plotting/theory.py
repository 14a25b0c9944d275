"""Figures of the theory checks: the inverse bound and the two-point sample complexity (:mod:`hmoe_sim.plotting`)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_inverse_bound", "plot_sample_complexity"]


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
