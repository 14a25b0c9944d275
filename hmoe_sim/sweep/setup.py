"""What one series of a sweep fits: its models and truths (:func:`series_setup`) and its fit box.

Used by the checks before work (:mod:`~hmoe_sim.sweep.checks`), by every cell
(:mod:`~hmoe_sim.sweep.cell`) and by the tables that need a series' models
(:mod:`~hmoe_sim.sweep.report`, :mod:`~hmoe_sim.sweep.ensemble`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hmoe_sim.estimators import Bounds
from hmoe_sim.models.base import MixtureModel, Params
from hmoe_sim.models.hmoe import HMoE
from hmoe_sim.models.presets import make_preset
from hmoe_sim.sweep.config import SeriesConfig, SweepConfig

__all__ = ["SeriesSetup", "fit_bounds", "series_setup"]


@dataclass(frozen=True)
class SeriesSetup:
    """What one series fits and how it is scored.

    Attributes
    ----------
    data_model, data_truth
        Model and parameters that generate the data (the preset's truth).
    fit_model
        The over-specified model fitted to the data.
    score_model, score_truth
        The truth expressed in ``fit_model``'s structure (for a non-shared fit of a shared
        truth: ``HMoE.to_nonshared(truth)``); Voronoi losses, L2 errors and near-truth starts
        use it. Both structures are scored on the same atoms ``model.mixing_measure``.
    noise_std : float
        Noise standard deviation of the data.
    """

    data_model: MixtureModel
    data_truth: Params
    fit_model: MixtureModel
    score_model: MixtureModel
    score_truth: Params
    noise_std: float


def series_setup(config: SweepConfig, series: SeriesConfig, truth_seed: int | None = None) -> SeriesSetup:
    """Build the models and truths of one series of ``config`` on truth ``truth_seed``.

    ``truth_seed`` defaults to the configuration's first truth seed.
    """
    seed = config.truth_seeds[0] if truth_seed is None else truth_seed
    setup = make_preset(series.preset, seed=seed, **series.truth_options)
    true_model, truth, fit_model = setup.true_model, setup.truth, setup.fit_model
    score_model, score_truth = true_model, truth
    structure = series.structure
    if structure is not None and isinstance(fit_model, HMoE) and structure != fit_model.structure:
        assert isinstance(true_model, HMoE)
        fit_model = fit_model.with_structure(structure)
        score_model, score_truth = true_model.with_structure(structure), true_model.to_nonshared(truth)
    return SeriesSetup(true_model, truth, fit_model, score_model, score_truth, setup.noise_std)


def fit_bounds(spec: Mapping[str, Any]) -> Bounds:
    """The fit box of a series' resolved ``fit.bounds`` table.

    Parameters
    ----------
    spec : mapping
        Keys ``default`` (a ``(low, high)`` pair), ``limits`` (parameter name -> pair) and
        ``boundary_tol``, each optional.

    Returns
    -------
    Bounds
    """
    kwargs: dict[str, Any] = {}
    if "default" in spec:
        kwargs["default"] = tuple(spec["default"])
    if "boundary_tol" in spec:
        kwargs["boundary_tol"] = spec["boundary_tol"]
    return Bounds({k: tuple(v) for k, v in spec.get("limits", {}).items()}, **kwargs)
