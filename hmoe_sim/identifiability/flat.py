"""Flat directions of the fitted class at the base split of the truth, and which ones the loss sees.

Beside ``identifiable`` (every exact representation has zero loss, :func:`loss_floor`), the
sweep's ``rates.csv`` reports how many directions of the fitted-size Jacobian at the base split
are flat (gauge removed) and how many of them move the Voronoi loss: a property of the class and
the truth, decided by no fit.
"""

from __future__ import annotations

from typing import NamedTuple

from hmoe_sim._validation import check_choice, check_positive_float, check_positive_int
from hmoe_sim.identifiability.exact import base_representation
from hmoe_sim.identifiability.spectra import flat_basis
from hmoe_sim.losses import eval_sample, voronoi_losses_for
from hmoe_sim.models.base import MixtureModel, Params

__all__ = ["FlatDirections", "LOSS_MOVE_TOL", "flat_directions"]

#: a loss change below this along a flat direction is round-off (losses are of order one)
LOSS_MOVE_TOL = 1e-10


class FlatDirections(NamedTuple):
    """Flat directions of the fitted-size Jacobian at the base split of the truth.

    Attributes
    ----------
    n_flat : int
        Singular values of ``J / sqrt(n)`` (gauge removed) below ``threshold`` x the largest.
    n_flat_loss : int
        How many of those directions move the loss: a step of ``step`` along the direction
        changes it by more than :data:`LOSS_MOVE_TOL` from its value at the base split (a
        second-order change counts: a mass trade of ``1e-4`` moves D1 by about ``1e-8``).
    """

    n_flat: int
    n_flat_loss: int


def flat_directions(
    fit_model: MixtureModel,
    true_model: MixtureModel,
    truth: Params,
    kind: str,
    *,
    r: float = 1,
    n_points: int = 4000,
    threshold: float = 1e-6,
    step: float = 1e-4,
) -> FlatDirections:
    """Count the flat directions of ``fit_model`` at the base split of ``truth``, and those the loss sees.

    A flat direction changes ``f`` only at second order or not at all; one that moves the
    Voronoi loss is a direction along which data cannot pin the loss down at first order.

    Parameters
    ----------
    fit_model, true_model, truth
        As in :func:`hmoe_sim.identifiability.exact_representations` (the loss is
        :func:`hmoe_sim.losses.voronoi_losses_for` against ``truth``, the sweep's scoring).
    kind : {"D1", "D2"}
        The loss.
    r : float, default 1
        Exponent of ``D2``.
    n_points : int, default 4000
        Inputs of :func:`hmoe_sim.losses.eval_sample` (seed 0, uniform) for the Jacobian; raised
        to the number of free scalars when smaller.
    threshold : float, default 1e-6
        Relative singular-value threshold of a flat direction.
    step : float, default 1e-4
        Step along each unit flat direction at which the loss change is measured.

    Returns
    -------
    FlatDirections
    """
    check_choice("kind", kind, ("D1", "D2"))
    threshold = check_positive_float("threshold", threshold)
    step = check_positive_float("step", step)
    base = base_representation(fit_model, true_model, truth)
    X = eval_sample(fit_model.input_dim, max(check_positive_int("n_points", n_points), fit_model.n_params), 0)
    directions = flat_basis(fit_model, base, X, threshold)
    if not directions.shape[1]:
        return FlatDirections(0, 0)
    truth64 = true_model.cast(truth, device="cpu", dtype=base[next(iter(base))].dtype)
    at_base = voronoi_losses_for(fit_model, base, true_model, truth64, kinds=(kind,), r=r)[kind]
    moved = fit_model.flatten(base).unsqueeze(0) + step * directions.T
    losses = voronoi_losses_for(fit_model, fit_model.unflatten(moved), true_model, truth64, kinds=(kind,), r=r)[kind]
    return FlatDirections(int(directions.shape[1]), int(((losses - at_base).abs() > LOSS_MOVE_TOL).sum()))
