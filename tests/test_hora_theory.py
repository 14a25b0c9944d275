"""The layer-exact regression function and the exact maps to the HMoE of hmoe_sim.models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hmoe_sim.hora import (
    ADAPTER_KINDS,
    MultiHeadAttention,
    layer_regression_function,
    row_one_readout,
    to_frozen_attention,
    to_hmoe,
)
from hmoe_sim.models import HMoE

F64 = torch.float64
N_TOKENS = 3


def _module(kind: str, *, bias: bool = True, n_prefix: int = 0, seed: int = 0) -> MultiHeadAttention:
    module = MultiHeadAttention(8, 2, adapter=kind, rank=2, hyper_dim=2, bias=bias, n_prefix=n_prefix, seed=seed,
                                dtype=F64)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen, dtype=F64))
    return module


def _inputs(seed: int = 1, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand((n, N_TOKENS * 8), generator=gen, dtype=F64) * 2 - 1
    u = torch.randn(8, generator=gen, dtype=F64)
    return X, u


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
@pytest.mark.parametrize("n_prefix", [0, 2])
@pytest.mark.parametrize("merged", [False, True])
def test_row_one_equals_layer_regression_function(kind: str, n_prefix: int, merged: bool) -> None:
    module = _module(kind, n_prefix=n_prefix)
    if merged and kind != "none":
        module.merge()
    X, u = _inputs()
    f = layer_regression_function(module, X, u)
    assert f.shape == (40,)
    torch.testing.assert_close(f, row_one_readout(module, X, u), rtol=0, atol=1e-10)
    # batched inputs (*batch, n, D)
    Xb = X.reshape(4, 10, -1)
    torch.testing.assert_close(layer_regression_function(module, Xb, u), f.reshape(4, 10), rtol=0, atol=1e-10)


def test_layer_regression_function_by_hand() -> None:
    """One head, E = 1, two tokens: f = u w_o (p_1 w_v x_1 + p_2 w_v x_2), p = softmax(w_q x_1 w_k x_j)."""
    module = MultiHeadAttention(1, 1, bias=False, seed=0, dtype=F64)
    wq, wk, wv, wo, u = 0.7, -1.3, 2.0, 0.5, 3.0
    with torch.no_grad():
        for name, w in zip("qkvo", (wq, wk, wv, wo), strict=True):
            module.base_linear(name).weight.fill_(w)
    x1, x2 = 0.4, -0.9
    s1, s2 = wq * x1 * wk * x1, wq * x1 * wk * x2
    p1 = math.exp(s1) / (math.exp(s1) + math.exp(s2))
    expected = u * wo * wv * (p1 * x1 + (1 - p1) * x2)
    X = torch.tensor([[x1, x2]], dtype=F64)
    readout = torch.tensor([u], dtype=F64)
    assert layer_regression_function(module, X, readout).item() == pytest.approx(expected, abs=1e-14)
    assert row_one_readout(module, X, readout).item() == pytest.approx(expected, abs=1e-14)


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_frozen_hmoe_equals_module_row_one(kind: str) -> None:
    module = _module(kind, bias=False, seed=3)
    with torch.no_grad():  # a key bias cancels in the softmax and is allowed
        module.base_linear("k").bias = nn.Parameter(torch.randn(8, dtype=F64), requires_grad=False)
    X, u = _inputs(seed=4)
    model = HMoE(to_frozen_attention(module, u), n_tokens=N_TOKENS, n_adapters=0)
    params = {name: torch.zeros(shape, dtype=F64) for name, shape in model.param_shapes().items()}
    torch.testing.assert_close(model.predict(params, X), row_one_readout(module, X, u), rtol=0, atol=1e-10)


def test_frozen_attention_readout_layout() -> None:
    """c_h = H (W^O_h)^T u with W^O_h the h-th column block of nn.Linear's weight."""
    module = _module("none", bias=False, seed=5)
    _, u = _inputs()
    att = to_frozen_attention(module, u)
    wo = module.base_linear("o").weight.detach()
    for h in range(2):
        torch.testing.assert_close(att.readout[h], 2 * wo[:, 4 * h:4 * (h + 1)].T @ u, rtol=0, atol=1e-14)
        torch.testing.assert_close(att.query[h], module.base_linear("q").weight.detach()[4 * h:4 * (h + 1)].T)


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
@pytest.mark.parametrize("key_bias", [False, True])
def test_prefixes_are_exact_hmoe_adapter_atoms(kind: str, key_bias: bool) -> None:
    module = _module(kind, bias=False, n_prefix=3, seed=6)
    if key_bias:
        module.base_linear("k").bias = nn.Parameter(torch.randn(8, dtype=F64), requires_grad=False)
    X, u = _inputs(seed=7)
    model, params = to_hmoe(module, u, n_tokens=N_TOKENS)
    assert model.n_adapters == 3 and model.structure == "nonshared"
    torch.testing.assert_close(model.predict(params, X), row_one_readout(module, X, u), rtol=0, atol=1e-10)
    # the atoms' form: zero bias mass, slope only on token 1, constant experts
    assert torch.count_nonzero(params["beta0"]) == 0 and torch.count_nonzero(params["a"]) == 0
    assert torch.count_nonzero(params["beta1"][..., 8:]) == 0


def test_maps_reject_biases_outside_the_hmoe() -> None:
    module = _module("lora", bias=True)
    _, u = _inputs()
    with pytest.raises(ValueError, match="query_bias is nonzero"):
        to_frozen_attention(module, u)
    with pytest.raises(ValueError, match="readout has shape"):
        to_frozen_attention(_module("lora", bias=False), u[:3])
    with pytest.raises(ValueError, match="tokens stacked"):
        layer_regression_function(module, torch.zeros(4, 9, dtype=F64), u)


def test_regression_function_gradient_matches_finite_differences() -> None:
    """Autograd through the HoRA generator vs central finite differences."""
    module = _module("hora", bias=True, seed=8)
    X, u = _inputs(seed=9, n=6)
    gen_a = module.v_proj.generator_A

    def f(values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            gen_a.copy_(values)
        return layer_regression_function(module, X, u).sum()

    base = gen_a.detach().clone()
    module.zero_grad()
    layer_regression_function(module, X, u).sum().backward()
    grad = gen_a.grad.clone()
    direction = torch.randn(base.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    eps = 1e-6
    numeric = (f(base + eps * direction) - f(base - eps * direction)) / (2 * eps)
    assert numeric.item() == pytest.approx((grad * direction).sum().item(), rel=1e-7, abs=1e-10)
