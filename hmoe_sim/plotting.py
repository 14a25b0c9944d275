"""All plotting of hmoe-sim (the only module that imports matplotlib).

Functions take tables (pandas DataFrames) or arrays computed elsewhere and return the
matplotlib ``Figure``; saving is the caller's choice (``fig.savefig(path)``). The
non-interactive Agg backend is selected so that plotting works on headless machines.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

__all__: list[str] = []


def _new_figure(width: float = 6.0, height: float = 4.5) -> tuple[plt.Figure, plt.Axes]:
    """A figure with one axes, laid out tightly."""
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    return fig, ax
