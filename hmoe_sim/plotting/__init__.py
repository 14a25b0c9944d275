"""All plotting of hmoe-sim (the only package that imports matplotlib).

Functions take tables (pandas DataFrames) or arrays computed elsewhere and return the
matplotlib ``Figure``; saving is the caller's choice (``fig.savefig(path)``). The
non-interactive Agg backend is selected here, before any figure module imports pyplot, so that
plotting works on headless machines. One module per topic: :mod:`~hmoe_sim.plotting.rates`
(a sweep's rates on n and n/sigma^2, forest plots), :mod:`~hmoe_sim.plotting.theory` (inverse
bound, sample complexity), :mod:`~hmoe_sim.plotting.finetune` (fine-tuning experiments).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

from hmoe_sim.plotting.finetune import plot_finetune_pretrained, plot_finetune_sample_efficiency  # noqa: E402
from hmoe_sim.plotting.rates import (  # noqa: E402
    REFERENCE_SLOPES,
    STRUCTURE_LABELS,
    plot_forest,
    plot_neff_axes,
    plot_neff_panels,
    plot_rate_axes,
    plot_rate_panels,
    series_labels,
)
from hmoe_sim.plotting.theory import plot_inverse_bound, plot_sample_complexity  # noqa: E402


def close_figure(fig: matplotlib.figure.Figure) -> None:
    """Release a figure that pyplot keeps open (call it once the figure is saved).

    Every ``plot_*`` function draws through pyplot, which keeps its figures until they are closed; a
    long-lived process that writes many figures (a sweep's ``plot`` calls inside one Python process)
    would otherwise accumulate them.
    """
    import matplotlib.pyplot as plt

    plt.close(fig)


__all__ = [
    "close_figure",
    "REFERENCE_SLOPES",
    "STRUCTURE_LABELS",
    "series_labels",
    "plot_neff_axes",
    "plot_neff_panels",
    "plot_finetune_pretrained",
    "plot_finetune_sample_efficiency",
    "plot_forest",
    "plot_inverse_bound",
    "plot_rate_axes",
    "plot_rate_panels",
    "plot_sample_complexity",
]
