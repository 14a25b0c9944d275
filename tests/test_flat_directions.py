"""Flat directions of the fitted class at the base split (issue 17: identifiability columns)."""

from __future__ import annotations

import pytest

from hmoe_sim.identifiability import flat_directions
from hmoe_sim.models.presets import make_preset

CALIBRATION = dict(n_true=2, gate_slope_std=2.0, expert_std=1.0, min_separation=1.0)


def test_an_exactly_specified_softmax_mixture_has_no_flat_direction():
    setup = make_preset("softmax-linear", seed=1, input_dim=4, n_fit=2, **CALIBRATION)
    assert flat_directions(setup.fit_model, setup.true_model, setup.truth, "D1") == (0, 0)


@pytest.mark.parametrize("d", [3, 4])
def test_one_split_atom_has_2d_plus_2_flat_directions(d: int):
    # the two copies of a split atom move oppositely in (beta1, a, b) -- 2D + 1 first-order flat
    # directions -- and trade mass (beta0), one more: 2D + 2, every one of them moving D1
    setup = make_preset("softmax-linear", seed=1, input_dim=d, n_fit=3, **CALIBRATION)
    got = flat_directions(setup.fit_model, setup.true_model, setup.truth, "D1")
    assert (got.n_flat, got.n_flat_loss) == (2 * d + 2, 2 * d + 2)


def test_the_headline_truth_in_both_structures():
    # issue 17's count at the fitted size: 6 shared, 20 non-shared (gauge removed)
    options = dict(expert_std=2.0, gate_slope_std=2.0, attention_std=0.3, code_activation="identity")
    setup = make_preset("hmoe-shared", seed=1, **options)
    assert flat_directions(setup.fit_model, setup.true_model, setup.truth, "D1").n_flat == 6
    nonshared = setup.fit_model.with_structure("nonshared")
    score = setup.true_model.with_structure("nonshared")
    assert flat_directions(nonshared, score, setup.true_model.to_nonshared(setup.truth), "D1").n_flat == 20


def test_bad_kind_is_named():
    setup = make_preset("softmax-linear", seed=1, input_dim=4, n_fit=2, **CALIBRATION)
    with pytest.raises(ValueError, match="L2"):
        flat_directions(setup.fit_model, setup.true_model, setup.truth, "L2")
