"""Exact representations, loss floors, Jacobian spectra and identifiable presets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hmoe_sim.identifiability import (
    exact_representations,
    gate_logit_spread,
    gauge_directions,
    jacobian_spectrum,
    loss_floor,
    nonidentifiable_reason,
    parameter_names,
    representation_losses,
)
from hmoe_sim.losses import eval_sample
from hmoe_sim.models import FlatMoE, FrozenAttention, HMoE, make_preset
from hmoe_sim.models.flat import min_pairwise_distance


def _random_inputs(d: int, seed: int = 7) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.concatenate([rng.uniform(-1, 1, (300, d)), 2.0 * rng.standard_normal((300, d))]))


def _hmoe(structure: str, first_level: str = "uniform", code_activation: str = "tanh",
          n_adapters: int = 1) -> HMoE:
    att = FrozenAttention.from_seed(3, n_heads=2, token_dim=2, key_dim=2, value_dim=2)
    return HMoE(att, n_tokens=2, n_adapters=n_adapters, structure=structure, code_dim=2,
                code_activation=code_activation, first_level=first_level)


def _flat_truth(model: FlatMoE, zero_slopes: int = 0) -> dict[str, torch.Tensor]:
    return model.sample_truth(5, gate_slope_std=1.0, expert_std=1.0, zero_gate_slopes=zero_slopes)


# (label, true model, truth, expected families when over-specified by one, expected at true size)
def _cases() -> list[tuple[str, object, dict[str, torch.Tensor], set[str], set[str]]]:
    anchors = {"beta0": np.zeros(1), "beta1": np.zeros((1, 3)), "a": np.full((1, 3), 0.3), "b": np.array([0.2])}
    out = []
    for expert, fams in (("identity", {"mass split", "linear split", "rescaling split"}),
                         ("relu", {"mass split", "rescaling split"}), ("tanh", {"mass split"})):
        m = FlatMoE(3, 2, gate="softmax", expert=expert, anchors=anchors)
        out.append((f"softmax-anchored-{expert}", m, _flat_truth(m), fams, set()))
    m = FlatMoE(3, 2, gate="softmax", expert="relu")
    out.append(("softmax-free-relu", m, _flat_truth(m), {"mass split", "rescaling split", "translation"},
                {"translation"}))
    for expert, fams, true_fams in (
            ("identity", {"linear split", "expert-halving split", "null-expert atom", "gate rescaling",
                          "constant-gate transfer"}, {"gate rescaling", "constant-gate transfer"}),
            ("relu", {"expert-halving split", "null-expert atom", "gate rescaling"}, {"gate rescaling"}),
            ("tanh", {"null-expert atom"}, set())):
        m = FlatMoE(3, 3, gate="sigmoid", expert=expert)
        out.append((f"sigmoid-{expert}", m, _flat_truth(m, zero_slopes=2), fams, true_fams))
    m = FlatMoE(3, 3, gate="sigmoid", expert="relu")
    out.append(("sigmoid-relu-slopes", m, _flat_truth(m), {"expert-halving split", "null-expert atom"}, set()))
    for first_level in ("uniform", "softmax"):
        m = _hmoe("nonshared", first_level)
        out.append((f"hmoe-nonshared-{first_level}", m, m.sample_truth(2, gate_slope_std=1.0),
                     {"mass split", "linear split", "rescaling split"}, set()))
    for act in ("identity", "tanh"):
        m = _hmoe("shared", "softmax", act)
        out.append((f"hmoe-shared-{act}", m, m.sample_truth(2, gate_slope_std=1.0), {"duplicated codes", "gauge"},
                    {"gauge"}))
    return out


CASES = _cases()


@pytest.mark.parametrize("extra", [0, 1, 2])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_representation_reproduces_f_star(case: tuple, extra: int) -> None:
    _, true_model, truth, fams, true_fams = case
    per_group = true_model.n_adapters if isinstance(true_model, HMoE) else true_model.n_atoms
    fit_model = true_model.with_atoms(per_group + extra)
    reps = exact_representations(fit_model, true_model, truth, delta=0.1)
    assert {name for name, _ in reps} == (true_fams if extra == 0 else fams)
    X = _random_inputs(true_model.input_dim)
    f_true = true_model.predict(truth, X)
    for name, params in reps:
        assert fit_model.batch_shape(params) == torch.Size([])
        err = (fit_model.predict(params, X) - f_true).abs().max().item()
        assert err <= 1e-10 * max(1.0, f_true.abs().max().item()), (name, err)
        # each family really moves away from the base split: the parameters differ from the truth's split
        assert fit_model.flatten(params).abs().sum() > 0


def test_representations_move_by_delta() -> None:
    """Two deltas give two different parameter sets with the same function."""
    m = FlatMoE(3, 2, gate="softmax", expert="identity",
                anchors={"beta0": np.zeros(1), "beta1": np.zeros((1, 3)), "a": np.ones((1, 3)), "b": np.ones(1)})
    truth = _flat_truth(m)
    a = dict(exact_representations(m.with_atoms(3), m, truth, delta=0.1))
    b = dict(exact_representations(m.with_atoms(3), m, truth, delta=0.2))
    for name in a:
        assert not torch.allclose(m.with_atoms(3).flatten(a[name]), m.with_atoms(3).flatten(b[name])), name


def test_closed_form_losses_of_softmax_splits() -> None:
    """Linear split: both copies of atom 0 (mass w/2) sit delta away in one cell, so
    D1 = w delta^2 and D2(r=1) = w delta (sqrt(D/(D+1)) + 1/sqrt(D+1)); rescaling split:
    D1 = w delta^2 ||(a*, b*)||^2; mass split: 0."""
    setup = make_preset("softmax-linear", seed=1, input_dim=4, gate_slope_std=2.0, expert_std=1.0,
                        min_separation=1.0)
    delta, d = 0.1, 4
    w = math.exp(setup.truth["beta0"][0].item())
    losses = representation_losses(setup.fit_model, setup.true_model, setup.truth, delta=delta)
    assert losses["mass split"]["D1"] < 1e-14 and losses["mass split"]["D2"] < 1e-14
    assert losses["linear split"]["D1"] == pytest.approx(w * delta**2, rel=1e-12)
    assert losses["linear split"]["D2"] == pytest.approx(
        w * delta * (math.sqrt(d / (d + 1)) + 1 / math.sqrt(d + 1)), rel=1e-12)
    norm2 = setup.truth["a"][0].square().sum().item() + setup.truth["b"][0].item() ** 2
    assert losses["rescaling split"]["D1"] == pytest.approx(w * delta**2 * norm2, rel=1e-12)


def test_loss_floor_zero_for_softmax_tanh() -> None:
    setup = make_preset("softmax-tanh", seed=0)
    assert [n for n, _ in exact_representations(setup.fit_model, setup.true_model, setup.truth)] == ["mass split"]
    for kind in ("D1", "D2"):
        assert loss_floor(setup.fit_model, setup.true_model, setup.truth, kind) <= 1e-14
    assert loss_floor(setup.fit_model, setup.true_model, setup.truth, "L2") == 0.0


@pytest.mark.parametrize("name", ["softmax-linear", "softmax-relu", "sigmoid-regime2", "hmoe-nonshared"])
def test_loss_floor_positive_for_flat_sets(name: str) -> None:
    setup = make_preset(name, seed=0)
    for kind in ("D1", "D2"):
        assert loss_floor(setup.fit_model, setup.true_model, setup.truth, kind, r=1) > 1e-4
    assert loss_floor(setup.fit_model, setup.true_model, setup.truth, "L2") == 0.0


def test_sigmoid_split_floor() -> None:
    """The expert-halving split (gate kept, expert halved) of the split start has D1 > 0 at
    delta -> 0: the duplicated atom doubles the mass of its cell."""
    setup = make_preset("sigmoid-regime2", seed=0, expert="relu")
    losses = representation_losses(setup.fit_model, setup.true_model, setup.truth, delta=1e-6)
    w0 = math.exp(setup.truth["beta0"][0].item())
    assert losses["expert-halving split"]["D1"] >= w0 * (1 - 1e-5)
    assert loss_floor(setup.fit_model, setup.true_model, setup.truth, "D1") >= losses["expert-halving split"]["D1"]


def test_hmoe_shared_has_zero_floor_and_nonshared_fit_of_shared_truth_has_positive() -> None:
    setup = make_preset("hmoe-shared", seed=0)
    assert loss_floor(setup.fit_model, setup.true_model, setup.truth, "D1") <= 1e-14
    true_ns = setup.true_model.with_structure("nonshared")
    truth_ns = setup.true_model.to_nonshared(setup.truth)
    assert loss_floor(setup.fit_model.with_structure("nonshared"), true_ns, truth_ns, "D1") > 1e-4


def test_exact_representations_bad_input() -> None:
    setup = make_preset("softmax-linear", seed=0)
    with pytest.raises(ValueError, match="delta"):
        exact_representations(setup.fit_model, setup.true_model, setup.truth, delta=1.0)
    with pytest.raises(ValueError, match="delta"):
        exact_representations(setup.fit_model, setup.true_model, setup.truth, delta=0.0)
    with pytest.raises(ValueError, match="fewer"):
        exact_representations(setup.true_model.with_atoms(1), setup.true_model, setup.truth)
    with pytest.raises(ValueError, match="expert"):
        exact_representations(FlatMoE(8, 3, expert="relu", anchors={k: v.numpy() for k, v in
                                                                     setup.true_model.anchors.items()}),
                              setup.true_model, setup.truth)
    with pytest.raises(TypeError, match="FlatMoE"):
        hm = make_preset("hmoe-nonshared")
        exact_representations(hm.fit_model, setup.true_model, setup.truth)
    with pytest.raises(ValueError, match="unbatched"):
        batched = {k: v.unsqueeze(0) for k, v in setup.truth.items()}
        exact_representations(setup.fit_model, setup.true_model, batched)
    with pytest.raises(ValueError, match="unknown kind 'D3'"):
        loss_floor(setup.fit_model, setup.true_model, setup.truth, "D3")


# ----------------------------------------------------------------------------- Jacobian spectra
def test_spectrum_one_atom_sigmoid_matches_closed_form_and_finite_differences() -> None:
    """One sigmoid atom, identity expert, D = 1: J = [s'(u) h, s'(u) h x, s x, s] with
    s = sigmoid(beta1 x + beta0), h = a x + b; compared with central finite differences."""
    model = FlatMoE(1, 1, gate="sigmoid", expert="identity")
    f64 = torch.float64
    params = {"beta0": torch.tensor([0.3], dtype=f64), "beta1": torch.tensor([[-0.7]], dtype=f64),
              "a": torch.tensor([[1.2]], dtype=f64), "b": torch.tensor([-0.4], dtype=f64)}
    x = torch.linspace(-1, 1, 7, dtype=torch.float64)
    X = x.unsqueeze(-1)
    s = torch.sigmoid(-0.7 * x + 0.3)
    h = 1.2 * x - 0.4
    closed = torch.stack([s * (1 - s) * h, s * (1 - s) * h * x, s * x, s], dim=1).numpy()
    theta = model.flatten(params)
    fd = np.empty((7, 4))
    eps = 1e-6
    for j in range(4):
        e = torch.zeros(4, dtype=torch.float64)
        e[j] = eps
        fd[:, j] = ((model.predict(model.unflatten(theta + e), X) - model.predict(model.unflatten(theta - e), X))
                    / (2 * eps)).numpy()
    np.testing.assert_allclose(fd, closed, atol=1e-9)
    expected = np.linalg.svd(closed / math.sqrt(7), compute_uv=False)
    spec = jacobian_spectrum(model, params, X)
    np.testing.assert_allclose(spec.singular_values, expected, rtol=1e-12)
    assert spec.n_gauge == 0 and spec.n_params == 4


def test_spectrum_one_atom_softmax_translation_gauge() -> None:
    """One free softmax atom without anchors: the gate is 1, f = a x + b. The gate columns are
    the translation gauge (2 exact zeros); on X = {-1, 1} the rest is [x, 1]/sqrt(2) -> (1, 1)."""
    model = FlatMoE(1, 1, gate="softmax", expert="identity")
    f64 = torch.float64
    params = {"beta0": torch.tensor([0.5], dtype=f64), "beta1": torch.tensor([[2.0]], dtype=f64),
              "a": torch.tensor([[0.3]], dtype=f64), "b": torch.tensor([0.1], dtype=f64)}
    X = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    removed = jacobian_spectrum(model, params, X, gauge="remove")
    np.testing.assert_allclose(removed.singular_values, [1.0, 1.0], rtol=1e-14)
    assert removed.n_gauge == 2 and np.all(removed.gauge_singular_values < 1e-15)
    kept = jacobian_spectrum(model, params, X, gauge="keep")
    np.testing.assert_allclose(kept.singular_values, [1.0, 1.0, 0.0, 0.0], atol=1e-15)


def test_spectrum_autodiff_fallback_equals_analytic() -> None:
    class NoAnalytic(HMoE):
        value_and_jacobian = None  # type: ignore[assignment]

    model = _hmoe("shared", "softmax")
    truth = model.sample_truth(1, gate_slope_std=1.0)
    plain = NoAnalytic(model.attention, n_tokens=2, n_adapters=1, structure="shared", code_dim=2,
                       code_activation="tanh", first_level="softmax")
    X = _random_inputs(model.input_dim)
    a, b = jacobian_spectrum(model, truth, X), jacobian_spectrum(plain, truth, X)
    np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("code_dim", "n_true"), [(2, 1), (3, 2)])
def test_shared_gauge_count(code_dim: int, n_true: int) -> None:
    """W -> W M, z -> M^-1 z: q^2 exact zeros at true size, reported apart (the codes of all
    heads, H * L* of them, must span R^q, else W has unused columns)."""
    setup = make_preset("hmoe-shared", seed=0, code_dim=code_dim, n_true=n_true, n_fit=n_true + 1)
    X = eval_sample(setup.true_model.input_dim, 4000, 0)
    kept = jacobian_spectrum(setup.true_model, setup.truth, X, gauge="keep")
    s = kept.singular_values
    assert int((s < 1e-10 * s[0]).sum()) == code_dim**2
    assert s[-code_dim**2 - 1] / s[0] > 1e-6
    removed = jacobian_spectrum(setup.true_model, setup.truth, X)
    assert removed.n_gauge == code_dim**2 and removed.singular_values.size == setup.true_model.n_params - code_dim**2
    assert np.all(removed.gauge_singular_values < 1e-12 * s[0])
    assert removed.ratio > 1e-6
    basis = gauge_directions(setup.true_model, setup.truth)
    np.testing.assert_allclose((basis.T @ basis).numpy(), np.eye(code_dim**2), atol=1e-12)


def test_shared_codes_that_do_not_span_are_named() -> None:
    """q = 3 but only H * L* = 2 codes: the unused code direction leaves W's columns free."""
    reason = nonidentifiable_reason("hmoe-shared", {"code_dim": 3})
    assert reason is not None and "W1[" in reason


def test_spectrum_bad_input() -> None:
    setup = make_preset("softmax-tanh")
    X = eval_sample(8, 10, 0)
    with pytest.raises(ValueError, match="unknown gauge"):
        jacobian_spectrum(setup.true_model, setup.truth, X, gauge="drop")
    with pytest.raises(ValueError, match="X must be"):
        jacobian_spectrum(setup.true_model, setup.truth, X[:, :3])
    with pytest.raises(ValueError, match="unbatched"):
        jacobian_spectrum(setup.true_model, {k: v.unsqueeze(0) for k, v in setup.truth.items()}, X)
    assert len(parameter_names(setup.true_model)) == setup.true_model.n_params


# ----------------------------------------------------------------------------- presets
IDENTIFIABLE = [("softmax-linear", {}), ("softmax-relu", {}), ("softmax-tanh", {}), ("hmoe-nonshared", {}),
                ("hmoe-shared", {}), ("sigmoid-regime1", {"expert": "tanh"}), ("sigmoid-regime2", {"expert": "tanh"}),
                ("softmax-tanh", {"input_dim": 4, "n_true": 2, "n_fit": 2, "gate_slope_std": 2.0,
                                  "expert_std": 1.0, "min_separation": 1.0})]


@pytest.mark.parametrize(("name", "options"), IDENTIFIABLE)
def test_identifiable_presets_have_full_rank_jacobian(name: str, options: dict) -> None:
    setup = make_preset(name, seed=0, **options)
    X = eval_sample(setup.true_model.input_dim, 10_000, 0)
    spec = jacobian_spectrum(setup.true_model, setup.truth, X)
    assert spec.ratio > 1e-6
    assert nonidentifiable_reason(name, options) is None


@pytest.mark.parametrize(("name", "expert", "n_zero", "words"), [
    ("sigmoid-regime1", "identity", None, "exactly linear"),
    ("sigmoid-regime1", "relu", 4, "atom(s) 0, 1, 2, 3"),
    ("sigmoid-regime2", "identity", 1, "atom(s) 3"),
    ("sigmoid-regime2", "relu", 1, "atom(s) 3"),
])
def test_nonidentifiable_presets_are_named(name: str, expert: str, n_zero: int | None, words: str) -> None:
    reason = nonidentifiable_reason(name, {"expert": expert})
    assert reason is not None and words in reason
    setup = make_preset(name, seed=0, expert=expert)
    X = eval_sample(setup.true_model.input_dim, 10_000, 0)
    s = jacobian_spectrum(setup.true_model, setup.truth, X).singular_values
    zeros = int((s < 1e-10 * s[0]).sum())
    assert zeros >= 1 if n_zero is None else zeros == n_zero
    if name == "sigmoid-regime1" and expert == "identity":
        x = np.concatenate([X.numpy(), np.ones((X.shape[0], 1))], axis=1)
        f = setup.true_model.predict(setup.truth, X).numpy()
        residual = f - x @ np.linalg.lstsq(x, f, rcond=None)[0]
        assert residual.std() < 1e-13


def test_nonidentifiable_reason_numeric_fallback() -> None:
    """Softmax with constant gates and linear experts: f* is linear; no structural rule names it,
    the Jacobian does."""
    reason = nonidentifiable_reason("softmax-linear", {"gate_slope_std": 0.0})
    assert reason is not None and "singular value" in reason
    assert any(token in reason for token in ("beta0[", "beta1[", "a[", "b["))


def test_figure1_presets_draw_the_same_atoms() -> None:
    opts = dict(input_dim=8, n_true=4, n_fit=5, expert="relu")
    sig = make_preset("sigmoid-regime2", seed=3, **opts)
    soft = make_preset("softmax-relu", seed=3, zero_gate_slopes=1, **opts)
    for key in ("beta0", "beta1", "a", "b"):
        assert torch.equal(sig.truth[key], soft.truth[key])
    assert soft.true_model.anchors is not None and sig.true_model.anchors is None
    assert bool((soft.truth["beta1"][-1] == 0).all())
    with pytest.raises(ValueError, match="zero_gate_slopes"):
        make_preset("softmax-relu", zero_gate_slopes=-1)


def test_calibration_truths_are_well_conditioned_and_separated() -> None:
    for seed in range(10):
        setup = make_preset("softmax-tanh", seed=seed, input_dim=4, n_true=2, n_fit=2, gate_slope_std=2.0,
                            expert_std=1.0, min_separation=1.0)
        atoms = setup.true_model.mixing_measure(setup.truth).atoms.numpy()
        assert min_pairwise_distance(atoms) >= 1.0
        assert setup.fit_model.n_atoms == 2
    X = eval_sample(4, 1000, 0)
    spread = gate_logit_spread(setup.true_model, setup.truth, X)
    assert spread.shape == (2,) and np.all(spread > 0.3)
