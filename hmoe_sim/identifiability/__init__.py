"""Identifiability: exact representations of a truth, loss floors, Jacobian spectra, tables.

* :mod:`~hmoe_sim.identifiability.exact` -- the known exact reparametrisations of a truth in an
  over-specified class (:func:`exact_representations`) and the loss floor they set
  (:func:`loss_floor`);
* :mod:`~hmoe_sim.identifiability.spectra` -- local identifiability at the true size by the
  singular values of the Jacobian of ``f`` (:func:`jacobian_spectrum`,
  :func:`nonidentifiable_reason`);
* :mod:`~hmoe_sim.identifiability.flat` -- flat directions of the fitted class at the base split
  and how many of them move the loss (:func:`flat_directions`);
* :mod:`~hmoe_sim.identifiability.tables` -- the diagnostic tables over the preset cases
  (:func:`floor_table`, :func:`spectrum_table`).
"""

from hmoe_sim.identifiability.exact import (
    EXACT_TOL,
    FLOOR_KINDS,
    atoms_per_group,
    base_representation,
    exact_representations,
    loss_floor,
    representation_losses,
)
from hmoe_sim.identifiability.flat import LOSS_MOVE_TOL, FlatDirections, flat_directions
from hmoe_sim.identifiability.spectra import (
    GAUGE_MODES,
    JacobianSpectrum,
    flat_basis,
    gate_logit_spread,
    gauge_directions,
    jacobian_spectrum,
    nonidentifiable_reason,
    parameter_names,
)
from hmoe_sim.identifiability.tables import DIAGNOSTIC_CASES, Case, floor_table, spectrum_table

__all__ = [
    "DIAGNOSTIC_CASES",
    "EXACT_TOL",
    "FLOOR_KINDS",
    "GAUGE_MODES",
    "LOSS_MOVE_TOL",
    "Case",
    "FlatDirections",
    "JacobianSpectrum",
    "atoms_per_group",
    "base_representation",
    "exact_representations",
    "flat_basis",
    "flat_directions",
    "floor_table",
    "gate_logit_spread",
    "gauge_directions",
    "jacobian_spectrum",
    "loss_floor",
    "nonidentifiable_reason",
    "parameter_names",
    "representation_losses",
    "spectrum_table",
]
