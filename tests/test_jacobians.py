"""Analytic Jacobians of the models against forward-mode autodiff (float64, ~1e-10)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from hmoe_sim.models.base import MixtureModel
from hmoe_sim.models.flat import FlatMoE
from hmoe_sim.models.hmoe import FrozenAttention, HMoE

TOL = dict(rtol=1e-10, atol=1e-12)


def _random_params(model: MixtureModel, batch: tuple[int, ...], seed: int, scale: float = 0.7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(*batch, *s, generator=g, dtype=torch.float64)
            for k, s in model.param_shapes().items()}


def _reference(model: MixtureModel, params: dict, X: torch.Tensor) -> torch.Tensor:
    """Forward-mode Jacobian, one parameter set at a time: ``(*batch, n, P)``."""
    theta = model.flatten(params)
    bp, bx = theta.shape[:-1], X.shape[:-2]
    batch = bp if len(bp) else bx
    theta = theta.expand(*batch, -1).reshape(-1, theta.shape[-1])
    Xs = X.expand(*batch, *X.shape[-2:]).reshape(-1, *X.shape[-2:])
    rows = [torch.func.jacfwd(lambda t, x=x: model.predict(model.unflatten(t), x, check=False))(t)
            for t, x in zip(theta, Xs, strict=True)]
    return torch.stack(rows).reshape(*batch, X.shape[-2], -1)


def _check(model: MixtureModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    X = 2 * torch.rand(3, 25, model.input_dim, generator=g, dtype=torch.float64) - 1
    params = _random_params(model, (3,), seed)
    # batched params and data, one data set for many parameter sets, one parameter set for many data sets
    cases = [(params, X), (params, X[0]), ({k: v[1] for k, v in params.items()}, X)]
    for p, x in cases:
        f, J = model.value_and_jacobian(p, x)
        torch.testing.assert_close(f, model.predict(p, x), **TOL)
        torch.testing.assert_close(J, _reference(model, p, x), **TOL)
        torch.testing.assert_close(model.jacobian(p, x), J, rtol=0, atol=0)


ANCHORS = {"beta0": [0.3], "beta1": [[0.2, -0.1, 0.4]], "a": [[-0.5, 0.1, 0.3]], "b": [0.2]}


@pytest.mark.parametrize(("gate", "expert", "anchored"),
                         list(itertools.product(["softmax", "sigmoid"], ["identity", "relu", "tanh"], [False, True])))
def test_flat_jacobian_matches_autodiff(gate, expert, anchored):
    model = FlatMoE(3, 3, gate=gate, expert=expert, anchors=ANCHORS if anchored else None)
    _check(model, seed=1)


def test_flat_jacobian_hand_computed_single_expert():
    # one free softmax atom and one anchor with zero logit and expert 0: f = s(l) * (a x + b), s the logistic
    model = FlatMoE(1, 1, anchors={"beta0": [0.0], "beta1": [[0.0]], "a": [[0.0]], "b": [0.0]})
    params = {"beta0": torch.tensor([0.5], dtype=torch.float64), "beta1": torch.tensor([[2.0]], dtype=torch.float64),
              "a": torch.tensor([[3.0]], dtype=torch.float64), "b": torch.tensor([-1.0], dtype=torch.float64)}
    x = 0.25
    X = torch.tensor([[x]], dtype=torch.float64)
    s = 1 / (1 + np.exp(-(2.0 * x + 0.5)))
    e = 3.0 * x - 1.0
    expected = [s * (1 - s) * e, s * (1 - s) * e * x, s * x, s]
    torch.testing.assert_close(model.jacobian(params, X)[0], torch.tensor(expected, dtype=torch.float64), **TOL)


@pytest.mark.parametrize(("structure", "first_level", "code_activation"), [
    ("nonshared", "uniform", "identity"),
    ("nonshared", "softmax", "identity"),
    ("shared", "uniform", "identity"),
    ("shared", "uniform", "tanh"),
    ("shared", "softmax", "tanh"),
])
def test_hmoe_jacobian_matches_autodiff(structure, first_level, code_activation):
    att = FrozenAttention.from_seed(3, n_heads=2, token_dim=2, key_dim=2, value_dim=3)
    model = HMoE(att, n_tokens=2, n_adapters=2, structure=structure, code_dim=3,
                 code_activation=code_activation, first_level=first_level)
    _check(model, seed=2)


def test_hmoe_jacobian_without_adapters():
    att = FrozenAttention.from_seed(4, n_heads=3, token_dim=2, key_dim=2, value_dim=2)
    model = HMoE(att, n_tokens=2, n_adapters=0, first_level="softmax")
    _check(model, seed=3)


def test_jacobian_rejects_bad_input():
    model = FlatMoE(3, 2)
    params = _random_params(model, (), 0)
    with pytest.raises(ValueError, match="X has shape"):
        model.jacobian(params, torch.zeros(4, 5, dtype=torch.float64))


@pytest.mark.parametrize("name", ["softmax-relu", "sigmoid-regime1", "hmoe-shared"])
def test_autograd_fallback_agrees_with_analytic(name):
    from hmoe_sim import make_preset
    from hmoe_sim.estimators._core import autograd_value_and_jacobian

    model = make_preset(name).fit_model
    params = _random_params(model, (2,), 5, scale=0.5)
    X = 2 * torch.rand(2, 40, model.input_dim, generator=torch.Generator().manual_seed(6), dtype=torch.float64) - 1
    f_ref, J_ref = autograd_value_and_jacobian(model, model.flatten(params), X)
    f, J = model.value_and_jacobian(params, X)
    torch.testing.assert_close(f, f_ref, **TOL)
    torch.testing.assert_close(J, J_ref, **TOL)


@pytest.mark.parametrize("model", [
    FlatMoE(3, 3, gate="softmax", expert="tanh", anchors=ANCHORS),
    FlatMoE(3, 2, gate="sigmoid", expert="relu"),
    HMoE(FrozenAttention.from_seed(3, n_heads=2, token_dim=2, key_dim=2, value_dim=3), n_tokens=2, n_adapters=2,
         structure="nonshared", first_level="softmax"),
    HMoE(FrozenAttention.from_seed(3, n_heads=2, token_dim=2, key_dim=2, value_dim=3), n_tokens=2, n_adapters=2,
         structure="shared", code_dim=3, code_activation="tanh", first_level="uniform"),
    HMoE(FrozenAttention.from_seed(3, n_heads=2, token_dim=2, key_dim=2, value_dim=3), n_tokens=2, n_adapters=2,
         structure="shared", code_dim=3, code_activation="identity", first_level="softmax"),
], ids=["flat-softmax", "flat-sigmoid", "hmoe-nonshared", "hmoe-shared-uniform", "hmoe-shared-softmax"])
def test_jacobian_of_parameters_that_require_grad_is_differentiable(model):
    # the same numbers as without autograd, and d(sum of w * J)/d theta equals central differences
    params = _random_params(model, (2,), 8)
    X = 2 * torch.rand(2, 30, model.input_dim, generator=torch.Generator().manual_seed(9), dtype=torch.float64) - 1
    f_plain, J_plain = model.value_and_jacobian(params, X)
    theta = model.flatten(params).requires_grad_(True)
    f, J = model.value_and_jacobian(model.unflatten(theta), X)
    assert torch.equal(f.detach(), f_plain) and torch.equal(J.detach(), J_plain)
    weights = torch.randn(J.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    (grad,) = torch.autograd.grad((weights * J).sum(), theta)

    def weighted_jacobian(t: torch.Tensor) -> float:
        return float((weights * model.value_and_jacobian(model.unflatten(t), X)[1]).sum())

    eps = 1e-6
    for b, i in [(0, 0), (1, theta.shape[-1] // 2), (1, theta.shape[-1] - 1)]:
        step = torch.zeros_like(theta)
        step[b, i] = eps
        central = (weighted_jacobian(theta.detach() + step) - weighted_jacobian(theta.detach() - step)) / (2 * eps)
        assert abs(float(grad[b, i]) - central) <= 1e-6 * max(1.0, abs(central))
