"""HMoE fits through the non-shared Jacobian: the frozen heads' atoms formed once per data set,
the column map ``M = d theta_ns / d theta_s`` and the shared normal equations ``M^T A_ns M``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmoe_sim import make_preset, sample_batch
from hmoe_sim.estimators import Bounds, init_near_truth
from hmoe_sim.estimators._core import Problem
from hmoe_sim.models.hmoe import FrozenAttention, HMoE

VARIANTS = [(act, gate) for act in ("identity", "tanh") for gate in ("uniform", "softmax")]


def _shared(code_activation: str, first_level: str) -> HMoE:
    att = FrozenAttention.from_seed(11, n_heads=3, token_dim=2, key_dim=2, value_dim=3)
    return HMoE(att, n_tokens=2, n_adapters=2, structure="shared", code_dim=3,
                code_activation=code_activation, first_level=first_level)


def _params(model: HMoE, batch: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.7 * torch.randn(*batch, *s, generator=g, dtype=torch.float64) for k, s in model.param_shapes().items()}


def _nonshared_vector(model: HMoE, theta: torch.Tensor) -> torch.Tensor:
    twin = model.with_structure("nonshared")
    return twin.flatten(model.to_nonshared(model.unflatten(theta)))


@pytest.mark.parametrize(("code_activation", "first_level"), VARIANTS)
def test_column_map_is_the_derivative_of_to_nonshared(code_activation, first_level):
    model = _shared(code_activation, first_level)
    params = _params(model, (2,), 1)
    M = model.column_map(params)
    theta = model.flatten(params)
    for b in range(2):
        # reverse-mode autodiff of the flattened map
        auto = torch.func.jacrev(lambda t: _nonshared_vector(model, t))(theta[b])
        torch.testing.assert_close(M[b], auto, rtol=1e-13, atol=1e-14)
        # central finite differences (independent of torch's derivative rules)
        h = 1e-6
        fd = torch.stack([(_nonshared_vector(model, theta[b] + h * e) - _nonshared_vector(model, theta[b] - h * e))
                          / (2 * h) for e in torch.eye(theta.shape[-1], dtype=torch.float64)], -1)
        torch.testing.assert_close(M[b], fd, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize(("code_activation", "first_level"), VARIANTS)
def test_shared_jacobian_and_normal_equations_against_finite_differences(code_activation, first_level):
    model = _shared(code_activation, first_level)
    params = _params(model, (2,), 2)
    g = torch.Generator().manual_seed(3)
    X = 2 * torch.rand(2, 30, model.input_dim, generator=g, dtype=torch.float64) - 1
    y = torch.randn(2, 30, generator=g, dtype=torch.float64)
    theta = model.flatten(params)
    f, J = model.value_and_jacobian(params, X)
    h = 1e-6
    cols = []
    for e in torch.eye(theta.shape[-1], dtype=torch.float64):
        up = model.predict(model.unflatten(theta + h * e), X)
        down = model.predict(model.unflatten(theta - h * e), X)
        cols.append((up - down) / (2 * h))
    torch.testing.assert_close(J, torch.stack(cols, -1), rtol=1e-6, atol=1e-8)
    # the solver's normal equations, M^T (J_ns^T J_ns) M through the Khatri-Rao blocks, against J
    w = torch.ones_like(y)
    problem = Problem(model, X, y, w, w.sum(-1), *Bounds().vectors(model))
    lin = problem.linearize(theta)
    assert lin.column_map is not None
    A, grad = lin.normal_equations()
    r = y - f
    torch.testing.assert_close(lin.r, r, rtol=1e-14, atol=1e-15)
    A_ref, g_ref = J.mT @ J, torch.einsum("bnp,bn->bp", J, r)
    torch.testing.assert_close(A, A_ref, rtol=1e-11, atol=1e-12 * float(A_ref.abs().max()))
    torch.testing.assert_close(grad, g_ref, rtol=1e-11, atol=1e-12 * float(g_ref.abs().max()))
    # rows of the stack: the map is picked with them
    A1, g1 = lin.normal_equations(torch.tensor([1]))
    torch.testing.assert_close(A1[0], A[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g1[0], grad[1], rtol=1e-12, atol=1e-14)


def test_column_map_rejects_the_nonshared_structure():
    model = _shared("tanh", "uniform").with_structure("nonshared")
    with pytest.raises(ValueError, match="'nonshared'"):
        model.column_map(_params(model, (), 0))


def test_frozen_atoms_reduce_the_known_experts_exactly():
    model = _shared("tanh", "uniform")
    X = 2 * torch.rand(5, 7, model.input_dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64) - 1
    logit, value = model.frozen_atoms(X)                       # head-major (5, H, 7)
    scores, experts = model.known_scores_and_experts(X)        # (5, 7, H, N)
    scores, experts = scores.transpose(-2, -3), experts.transpose(-2, -3)
    # sum_j e^{s_j} = e^F and sum_j e^{s_j} v_j = e^F V, summed directly
    torch.testing.assert_close(torch.exp(logit), torch.exp(scores).sum(-1), rtol=1e-14, atol=0)
    torch.testing.assert_close(torch.exp(logit) * value, (torch.exp(scores) * experts).sum(-1), rtol=1e-13,
                               atol=1e-15)


@pytest.mark.parametrize("name", ["hmoe-shared", "hmoe-nonshared"])
def test_prepared_inputs_belong_to_their_data_set(name):
    s = make_preset(name, seed=1)
    model = s.fit_model
    theta = model.flatten(init_near_truth(model, s.true_model, s.truth, batch_shape=3, perturbation=0.2, seed=2))
    stacks = []
    for data_seed in (5, 6):  # two data sets of the same shape, fitted with the same model object
        X, y = sample_batch(s.true_model, s.truth, 50, s.noise_std, [np.random.SeedSequence([data_seed, b])
                                                                    for b in range(3)])
        w = torch.ones_like(y)
        problem = Problem(model, X, y, w, w.sum(-1), *Bounds().vectors(model))
        f = problem.predict(theta)
        # the prepared atoms are those of this problem's X, and the prediction is the model's own on X
        assert torch.equal(f, model.predict(model.unflatten(theta), X, check=False))
        for got, want in zip(problem.prepared(), model.prepare_inputs(X), strict=True):
            assert torch.equal(got, want)
        assert torch.equal(problem.prepared()[2][:, 1:], X.transpose(-1, -2))
        stacks.append(problem)
    assert not torch.equal(stacks[0].prepared()[0], stacks[1].prepared()[0])
    # the model itself keeps nothing per sample: its cache holds the frozen weights by device and dtype
    assert all(t.shape[0] == model.n_heads for ts in model._frozen_cache.values() for t in ts)
    # a sub-stack carries the rows of its own data sets
    sub = stacks[1].take(torch.tensor([2, 0]))
    for got, full in zip(sub.prepared(), stacks[1].prepared(), strict=True):
        assert torch.equal(got, full[torch.tensor([2, 0])])
    torch.testing.assert_close(sub.predict(theta[[2, 0]]), stacks[1].predict(theta)[[2, 0]], rtol=1e-14, atol=0)


@pytest.mark.parametrize(("code_activation", "first_level"), VARIANTS)
@pytest.mark.parametrize("structure", ["shared", "nonshared"])
def test_in_place_jacobian_factors_are_the_same_numbers(code_activation, first_level, structure):
    # the estimators' in-place evaluation runs the same operations on the same numbers as the
    # out-of-place one (which autograd needs): bit for bit, with the blocks in the matmul's buffer
    model = _shared(code_activation, first_level)
    if structure == "nonshared":
        model = model.with_structure("nonshared")
    params = _params(model, (3,), 4)
    X = torch.randn(3, 57, model.input_dim, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    prepared = model.prepare_inputs(X)
    f, pieces, M = model.jacobian_factors(params, X, prepared)
    f_ip, pieces_ip, M_ip = model.jacobian_factors(params, X, prepared, in_place=True)
    assert torch.equal(f_ip, f)
    assert len(pieces_ip) == len(pieces)
    for (g, outer), (g_ip, outer_ip) in zip(pieces, pieces_ip, strict=True):
        assert outer_ip == outer and torch.equal(g_ip, g)
    assert (M is None and M_ip is None) or torch.equal(M_ip, M)
    # every block lies in one buffer, in slot order, so the factored form reads them without a copy
    from hmoe_sim.estimators._core import khatri_rao_layout
    layout = khatri_rao_layout(pieces_ip, model.input_dim)
    assert layout is not None
    assert layout.factors(pieces_ip).data_ptr() == pieces_ip[0][0].data_ptr()


def test_in_place_evaluation_is_ignored_under_autograd():
    # parameters that require grad keep the out-of-place path: the graph stays differentiable,
    # with the numbers of the in-place path
    model = _shared("tanh", "softmax").with_structure("nonshared")
    params = _params(model, (2,), 6)
    X = torch.randn(2, 31, model.input_dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    _, _, g_ip, pi_ip, _ = model._head_major(params, X, None, True)
    tracked = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    _, _, g, pi, _ = model._head_major(tracked, X, None, True)
    assert torch.equal(g.detach(), g_ip) and torch.equal(pi.detach(), pi_ip)
    ((g * pi).sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tracked.values())
