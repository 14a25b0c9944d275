"""Tests of hmoe_sim.losses: hand-computed Voronoi losses, invariances, L2 error closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmoe_sim.losses import eval_sample, l2_error, voronoi_loss, voronoi_losses_for
from hmoe_sim.models import FlatMoE, make_preset

# Two true atoms in 2-D and three fitted atoms; a1 = (2, 0) is equidistant from both true atoms
# (tie -> lowest index, cell 1), a2 = (0, -1) is in cell 1, a3 = (4, 3) alone in cell 2.
TRUE_W = np.array([1.0, 2.0])
TRUE_A = np.array([[0.0, 0.0], [4.0, 0.0]])
FIT_W = np.array([0.5, 0.25, 1.5])
FIT_A = np.array([[2.0, 0.0], [0.0, -1.0], [4.0, 3.0]])
# masses: cell 1 0.75 vs 1 -> 0.25; cell 2 1.5 vs 2 -> 0.5; total 0.75
HAND = {
    ("D1", 1): 0.5 * 2**2 + 0.25 * 1**2 + 1.5 * 3 + 0.75,  # multi-atom cell squared, singleton linear
    ("D2", 1): 0.5 * 2 + 0.25 * 1 + 1.5 * 3 + 0.75,
    ("D2", 2): 0.5 * 4 + 0.25 * 1 + 1.5 * 9 + 0.75,
}


@pytest.mark.parametrize("kind,r", list(HAND))
def test_hand_computed(kind: str, r: int) -> None:
    loss, br = voronoi_loss(FIT_W, FIT_A, TRUE_W, TRUE_A, kind=kind, r=r, return_breakdown=True)
    assert isinstance(loss, np.ndarray) and loss.shape == ()
    assert loss == pytest.approx(HAND[(kind, r)], rel=1e-14)
    np.testing.assert_array_equal(br["assignment"], [0, 0, 1])  # the tie went to the lowest index
    np.testing.assert_array_equal(br["cell_size"], [2, 1])
    np.testing.assert_allclose(br["mass_error"], [-0.25, -0.5])


def test_d1_ignores_r() -> None:
    assert voronoi_loss(FIT_W, FIT_A, TRUE_W, TRUE_A, kind="D1", r=2) == pytest.approx(HAND[("D1", 1)])


def test_two_level_groups_hand_computed() -> None:
    fit_a = np.array([[3.0, 0.0], [0.0, -1.0], [4.0, 3.0]])
    # with groups a1 (head 0) must join t1 (head 0) although t2 is nearer
    with_groups = voronoi_loss(FIT_W, fit_a, TRUE_W, TRUE_A, kind="D1", groups=[0, 0, 1], true_groups=[0, 1])
    assert with_groups == pytest.approx(0.5 * 9 + 0.25 * 1 + 1.5 * 3 + 0.75)
    # without groups a1 joins t2: t1 = {a2} singleton, t2 = {a1, a3} multi-atom
    without = voronoi_loss(FIT_W, fit_a, TRUE_W, TRUE_A, kind="D1")
    assert without == pytest.approx(0.25 * 1 + 0.5 * 1 + 1.5 * 9 + 0.75 + 0.0)
    d2 = voronoi_loss(FIT_W, fit_a, TRUE_W, TRUE_A, kind="D2", r=2, groups=[0, 0, 1], true_groups=[0, 1])
    assert d2 == pytest.approx(0.5 * 9 + 0.25 * 1 + 1.5 * 9 + 0.75)


def test_blocks_split_the_norm() -> None:
    fit_a = np.array([[2.0, 0.0], [0.0, -1.0], [5.0, 3.0]])  # a3 - t2 = (1, 3)
    one = voronoi_loss(FIT_W, fit_a, TRUE_W, TRUE_A, kind="D1")
    two = voronoi_loss(FIT_W, fit_a, TRUE_W, TRUE_A, kind="D1", blocks=(1, 1))
    assert one == pytest.approx(2.25 + 1.5 * np.sqrt(10) + 0.75)
    assert two == pytest.approx(2.25 + 1.5 * (1 + 3) + 0.75)


def test_empty_cell_costs_its_mass() -> None:
    loss = voronoi_loss(np.array([1.0]), np.array([[0.5, 0.0]]), TRUE_W, TRUE_A, kind="D2", r=1)
    assert loss == pytest.approx(1.0 * 0.5 + 0.0 + 2.0)


@pytest.mark.parametrize("kind,r", [("D1", 1), ("D2", 1), ("D2", 2)])
def test_zero_at_truth_and_positive_off_truth(kind: str, r: int) -> None:
    assert voronoi_loss(TRUE_W, TRUE_A, TRUE_W, TRUE_A, kind=kind, r=r) == 0.0
    w = TRUE_W.copy()
    w[1] += 1e-3
    assert voronoi_loss(w, TRUE_A, TRUE_W, TRUE_A, kind=kind, r=r) > 0
    a = TRUE_A.copy()
    a[0, 1] += 1e-3
    assert voronoi_loss(TRUE_W, a, TRUE_W, TRUE_A, kind=kind, r=r) > 0


@pytest.mark.parametrize("kind,r", [("D1", 1), ("D2", 1), ("D2", 2)])
def test_permutation_invariance_batch_loop_numpy_torch(kind: str, r: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.uniform(0.1, 2.0, size=(4, 3, 5))
    a = rng.normal(size=(4, 3, 5, 3))
    tw, ta = rng.uniform(0.5, 1.5, size=2), rng.normal(size=(2, 3))
    batch = voronoi_loss(w, a, tw, ta, kind=kind, r=r)
    assert batch.shape == (4, 3)
    loop = np.array([[voronoi_loss(w[i, j], a[i, j], tw, ta, kind=kind, r=r) for j in range(3)] for i in range(4)])
    np.testing.assert_allclose(batch, loop, rtol=1e-14)
    for _ in range(5):
        perm = rng.permutation(5)
        np.testing.assert_allclose(voronoi_loss(w[..., perm], a[..., perm, :], tw, ta, kind=kind, r=r), batch,
                                   rtol=1e-13)
    t = voronoi_loss(torch.from_numpy(w), torch.from_numpy(a), torch.from_numpy(tw), ta, kind=kind, r=r)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
    np.testing.assert_allclose(t.numpy(), batch, rtol=1e-15)


def test_torch_float32_on_device(device: str) -> None:
    w = torch.tensor(FIT_W, dtype=torch.float32, device=device)
    a = torch.tensor(FIT_A, dtype=torch.float32, device=device)
    out = voronoi_loss(w, a, TRUE_W, TRUE_A, kind="D1")
    assert out.dtype == torch.float32 and out.device.type == device
    assert out.item() == pytest.approx(HAND[("D1", 1)], rel=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(atoms=np.zeros((3, 3))), "p=3"),
        (dict(weights=np.array([0.5, -0.25, 1.5])), "non-negative"),
        (dict(atoms=np.array([[np.nan, 0.0], [0.0, 1.0], [1.0, 1.0]])), "NaN"),
        (dict(r=0.5), "r must be >= 1"),
        (dict(kind="D3"), "unknown kind 'D3'"),
        (dict(groups=[0, 0, 1]), "together"),
        (dict(groups=[0, 0, 2], true_groups=[0, 1]), r"group\(s\) \[2\]"),
        (dict(blocks=(1, 2)), "blocks"),
    ],
)
def test_bad_input_raises(kwargs: dict, match: str) -> None:
    args = dict(weights=FIT_W, atoms=FIT_A, true_weights=TRUE_W, true_atoms=TRUE_A)
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k not in args}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        voronoi_loss(args["weights"], args["atoms"], args["true_weights"], args["true_atoms"], **opts)


def test_losses_for_shared_hmoe_use_generated_atoms() -> None:
    setup = make_preset("hmoe-shared", seed=1)
    model, truth = setup.true_model, setup.truth
    losses = voronoi_losses_for(model, truth, model, truth, kinds=("D1", "D2"))
    assert losses["D1"].item() == 0.0 and losses["D2"].item() == 0.0
    moved = dict(truth, z=truth["z"] + 1e-2)
    gen = model.to_nonshared(moved)
    expect = voronoi_losses_for(model.with_structure("nonshared"), gen, model.with_structure("nonshared"),
                                model.to_nonshared(truth))
    got = voronoi_losses_for(model, moved, model, truth)
    for kind in ("D1", "D2"):
        assert got[kind].item() > 0
        assert got[kind].item() == pytest.approx(expect[kind].item(), rel=1e-14)


def test_losses_for_batched_fits_match_loop() -> None:
    setup = make_preset("softmax-linear", seed=0)
    fit = setup.fit_model
    rng = np.random.default_rng(3)
    params = {k: torch.from_numpy(rng.normal(0, 0.3, size=(2, 3, *s))) for k, s in fit.param_shapes().items()}
    batch = voronoi_losses_for(fit, params, setup.true_model, setup.truth, r=2)
    for i in range(2):
        for j in range(3):
            one = voronoi_losses_for(fit, {k: v[i, j] for k, v in params.items()}, setup.true_model, setup.truth, r=2)
            for kind in ("D1", "D2"):
                assert batch[kind][i, j].item() == pytest.approx(one[kind].item(), rel=1e-14)


def test_l2_error_zero_at_truth_and_closed_form() -> None:
    d = 3
    model = FlatMoE(d, 1, gate="softmax", expert="identity")  # one expert: f(x) = a^T x + b
    truth = {"beta0": torch.zeros(1, dtype=torch.float64), "beta1": torch.zeros(1, d, dtype=torch.float64),
             "a": torch.tensor([[0.5, -1.0, 0.25]], dtype=torch.float64), "b": torch.tensor([0.1], dtype=torch.float64)}
    assert l2_error(model, truth, truth).item() == 0.0
    da, db = np.array([0.3, 0.1, -0.2]), 0.05
    fit = dict(truth, a=truth["a"] + torch.from_numpy(da), b=truth["b"] + db)
    # X ~ U([-1,1]^3): E[(da^T X + db)^2] = |da|^2 / 3 + db^2
    exact = np.sqrt(np.sum(da**2) / 3 + db**2)
    got = l2_error(model, fit, truth, n_eval=200_000, seed=5).item()
    assert got == pytest.approx(exact, rel=1e-2)
    # on the fixed sample itself the value is the sample RMS, reproducible from (n_eval, seed)
    X = eval_sample(d, 1000, 7)
    sample_rms = torch.sqrt(((X @ torch.from_numpy(da) + db) ** 2).mean()).item()
    assert l2_error(model, fit, truth, n_eval=1000, seed=7).item() == pytest.approx(sample_rms, rel=1e-12)


def test_l2_error_batched_chunks_match_loop(device: str) -> None:
    setup = make_preset("hmoe-nonshared", seed=0)
    fit = setup.fit_model
    rng = np.random.default_rng(1)
    params = {k: torch.from_numpy(rng.normal(0, 0.3, size=(5, *s))).to(device) for k, s in fit.param_shapes().items()}
    batch = l2_error(fit, params, setup.truth, n_eval=500, max_elements=1000)  # forces chunks of one fit
    assert batch.shape == (5,) and batch.device.type == device
    loop = [l2_error(fit, {k: v[i] for k, v in params.items()}, setup.truth, n_eval=500).item() for i in range(5)]
    np.testing.assert_allclose(batch.cpu().numpy(), loop, rtol=1e-12)
