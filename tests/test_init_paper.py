"""Tests of init_paper, the group's SGD start recipe: noise scale in n, layout, assignment, seeds, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmoe_sim.estimators import Bounds, init_paper
from hmoe_sim.models import FlatMoE, make_preset


def _separated_flat(gate: str = "softmax", anchored: bool = False, k_true: int = 3, k_fit: int = 4):
    """A flat truth with atoms far apart (expert biases 0, 3, 6, ...), so the source atom of a start is plain."""
    d = 3
    rng = np.random.default_rng(5)
    anchors = None
    if anchored:
        anchors = {"beta0": np.zeros(1), "beta1": np.zeros((1, d)), "a": np.ones((1, d)), "b": np.zeros(1)}
    true_model = FlatMoE(d, k_true, gate=gate, anchors=anchors)
    truth = {"beta0": torch.as_tensor(rng.normal(0, 0.5, k_true)),
             "beta1": torch.as_tensor(rng.normal(0, 1, (k_true, d))),
             "a": torch.as_tensor(rng.normal(0, 1, (k_true, d))),
             "b": torch.arange(k_true, dtype=torch.float64) * 3.0}
    return true_model, truth, true_model.with_atoms(k_fit)


def _sources(start: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> np.ndarray:
    """True atom each fitted atom was copied from: the nearest expert bias (noise << spacing 3)."""
    return np.abs(start["b"].numpy()[..., :, None] - truth["b"].numpy()).argmin(-1)


@pytest.mark.parametrize("noise", ["per_atom", "per_coordinate"])
def test_noise_sd_scales_as_n_to_the_exponent(noise: str) -> None:
    true_model, truth, fit_model = _separated_flat(gate="sigmoid")
    for n in (10**3, 10**5):
        start = init_paper(fit_model, true_model, truth, n, batch_shape=(20_000,), seed=n, noise=noise)
        src = _sources(start, truth)
        dev_gate = start["beta1"].numpy() - truth["beta1"].numpy()[src]
        dev_expert = start["a"].numpy() - truth["a"].numpy()[src]
        dev_mass = start["beta0"].numpy() - truth["beta0"].numpy()[src]
        for dev, scale in ((dev_gate, 0.005), (dev_expert, 0.05), (dev_mass, 0.005)):
            assert dev.std() == pytest.approx(scale * n**-0.083, rel=0.02)
            assert abs(dev.mean()) < 0.05 * scale * n**-0.083


def test_per_atom_noise_is_one_scalar_per_atom_vector() -> None:
    true_model, truth, fit_model = _separated_flat(gate="sigmoid")
    start = init_paper(fit_model, true_model, truth, 1000, batch_shape=(50,), seed=2, noise="per_atom")
    src = _sources(start, truth)
    gate = np.concatenate([(start["beta0"].numpy() - truth["beta0"].numpy()[src])[..., None],
                           start["beta1"].numpy() - truth["beta1"].numpy()[src]], axis=-1)
    expert = np.concatenate([start["a"].numpy() - truth["a"].numpy()[src],
                             (start["b"].numpy() - truth["b"].numpy()[src])[..., None]], axis=-1)
    for dev in (gate, expert):
        np.testing.assert_allclose(dev, np.broadcast_to(dev[..., :1], dev.shape), atol=1e-14)
        assert np.ptp(dev[..., 0]) > 0  # but it differs between atoms and starts
    assert not np.allclose(gate[..., 0], expert[..., 0] / 10)  # gating and expert draws are independent
    per_coord = init_paper(fit_model, true_model, truth, 1000, batch_shape=(50,), seed=2, noise="per_coordinate")
    dev = per_coord["a"].numpy() - truth["a"].numpy()[_sources(per_coord, truth)]
    assert np.ptp(dev, axis=-1).min() > 0


def test_every_true_atom_is_used_and_the_extra_atom_is_uniform() -> None:
    true_model, truth, fit_model = _separated_flat(gate="sigmoid", k_true=3, k_fit=4)
    start = init_paper(fit_model, true_model, truth, 1000, batch_shape=(6000,), seed=3)
    src = _sources(start, truth)
    assert all(set(row) == {0, 1, 2} for row in src.tolist())
    # uniform over the 36 surjections of 4 atoms onto 3: the last fitted atom copies each true atom w.p. 1/3,
    # and every fitted atom is the duplicate's partner equally often
    np.testing.assert_allclose(np.bincount(src[:, -1], minlength=3) / len(src), 1 / 3, atol=0.025)
    np.testing.assert_allclose(np.bincount(src[:, 0], minlength=3) / len(src), 1 / 3, atol=0.025)


def test_hmoe_nonshared_assigns_per_head_and_rejects_shared() -> None:
    setup = make_preset("hmoe-nonshared", n_true=2, n_fit=3, expert_std=3.0, min_separation=2.0)
    start = init_paper(setup.fit_model, setup.true_model, setup.truth, 1000, batch_shape=(200,), seed=4)
    assert start["beta1"].shape == (200, 2, 3, setup.true_model.input_dim)
    for h in range(2):
        atoms = torch.cat([start["a"][:, h], start["b"][:, h, :, None]], -1).numpy()
        true_atoms = torch.cat([setup.truth["a"][h], setup.truth["b"][h, :, None]], -1).numpy()
        src = np.linalg.norm(atoms[:, :, None] - true_atoms[None, None], axis=-1).argmin(-1)
        assert all(set(row) == {0, 1} for row in src.tolist())
    shared = make_preset("hmoe-shared")
    with pytest.raises(ValueError, match="'shared'"):
        init_paper(shared.fit_model, shared.true_model, shared.truth, 1000)


def test_reference_gate_starts_at_zero_only_without_anchors() -> None:
    n = 1000
    sd = 0.005 * n**-0.083
    true_model, truth, fit_model = _separated_flat(gate="softmax", anchored=False)
    start = init_paper(fit_model, true_model, truth, n, batch_shape=(100,), seed=6)
    assert start["beta1"][:, -1].abs().max() < 6 * sd and start["beta0"][:, -1].abs().max() < 6 * sd
    src = _sources(start, truth)[:, -1]
    expert_dev = start["a"][:, -1].numpy() - truth["a"].numpy()[src]
    assert np.abs(expert_dev).max() < 6 * 0.05 * n**-0.083  # the expert still comes from its true atom
    true_model, truth, fit_model = _separated_flat(gate="softmax", anchored=True)
    start = init_paper(fit_model, true_model, truth, n, batch_shape=(100,), seed=6)
    src = _sources(start, truth)[:, -1]
    np.testing.assert_allclose(start["beta1"][:, -1].numpy(), truth["beta1"].numpy()[src], atol=6 * sd)


def test_reproducible_from_seed_and_clipped_into_bounds() -> None:
    true_model, truth, fit_model = _separated_flat()
    a = init_paper(fit_model, true_model, truth, 500, batch_shape=(4, 2), seed=7)
    b = init_paper(fit_model, true_model, truth, 500, batch_shape=(4, 2), seed=7)
    c = init_paper(fit_model, true_model, truth, 500, batch_shape=(4, 2), seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["b"], c["b"])
    assert a["b"].shape == (4, 2, 4) and a["b"].dtype == torch.float64
    assert init_paper(fit_model, true_model, truth, 500)["b"].shape == (4,)
    clipped = init_paper(fit_model, true_model, truth, 500, batch_shape=(10,), seed=7,
                         bounds=Bounds({"b": (-1.0, 1.0)}))
    assert clipped["b"].max() <= 1.0 and clipped["b"].max() == 1.0  # the atoms at b* = 3, 6 are clipped
    f32 = init_paper(fit_model, true_model, truth, 500, seed=7, dtype=torch.float32)
    assert f32["a"].dtype == torch.float32


def test_bad_input_is_rejected_with_the_value_named() -> None:
    true_model, truth, fit_model = _separated_flat()
    with pytest.raises(ValueError, match="'per_head'"):
        init_paper(fit_model, true_model, truth, 100, noise="per_head")
    with pytest.raises(ValueError, match="-3"):
        init_paper(fit_model, true_model, truth, -3)
    with pytest.raises(ValueError, match="gate_scale"):
        init_paper(fit_model, true_model, truth, 100, gate_scale=-0.1)
    with pytest.raises(ValueError, match="exponent"):
        init_paper(fit_model, true_model, truth, 100, exponent=float("nan"))
    with pytest.raises(ValueError, match="fewer"):
        init_paper(true_model.with_atoms(2), true_model, truth, 100)
