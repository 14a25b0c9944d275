"""Adapter layers and the multi-head attention module, against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from adapter_helpers import randomize_trainable
from torch import nn

from hmoe_sim.hora import (
    ADAPTER_KINDS,
    HoRALinear,
    LoRALinear,
    MultiHeadAttention,
    MultiHeadLoRALinear,
    adapter_parameter_count,
)

F64 = torch.float64
ADAPTED = ("lora", "mh-lora", "hora")


def _linear(seed: int, n_in: int = 6, n_out: int = 4, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias, dtype=F64)


def _adapter(kind: str, base: nn.Linear, rank: int = 2, alpha: float = 3.0, dropout: float = 0.0) -> nn.Module:
    if kind == "lora":
        return LoRALinear(base, rank, alpha, dropout)
    if kind == "mh-lora":
        return MultiHeadLoRALinear(base, 2, rank, alpha, dropout)
    return HoRALinear(base, 2, rank, alpha, dropout, hyper_dim=2)


def _reference_delta(layer: nn.Module) -> np.ndarray:
    """``delta_W`` rebuilt from the raw factors with numpy loops (no library code)."""
    s = layer.alpha / layer.rank
    if isinstance(layer, LoRALinear):
        return s * layer.lora_B.detach().numpy() @ layer.lora_A.detach().numpy()
    blocks = []
    for h in range(layer.n_heads):
        if isinstance(layer, MultiHeadLoRALinear):
            a, b = layer.lora_A[h].detach().numpy(), layer.lora_B[h].detach().numpy()
        else:
            e = layer.head_embeddings.detach().numpy()[h]
            a = layer.shared_A.detach().numpy().copy()
            b = layer.shared_B.detach().numpy().copy()
            for k in range(layer.hyper_dim):
                a += e[k] * layer.generator_A.detach().numpy()[k]
                b += e[k] * layer.generator_B.detach().numpy()[k]
        blocks.append(s * b @ a)
    return np.concatenate(blocks, axis=0)


# ---------------------------------------------------------------------------- adapter linears
def test_lora_delta_weight_by_hand() -> None:
    layer = LoRALinear(nn.Linear(2, 2, bias=False, dtype=F64), rank=1, alpha=4.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor([[1.0, 2.0]]))
        layer.lora_B.copy_(torch.tensor([[3.0], [-1.0]]))
    # scaling = 4 / 1; B A = [[3, 6], [-1, -2]]
    expected = torch.tensor([[12.0, 24.0], [-4.0, -8.0]], dtype=F64)
    assert layer.scaling == 4.0
    assert torch.equal(layer.get_delta_weight(), expected)


@pytest.mark.parametrize("kind", ADAPTED)
def test_zero_initialised_adapter_equals_base(kind: str) -> None:
    base = _linear(0)
    layer = _adapter(kind, base, dropout=0.3)
    x = torch.randn(5, 6, dtype=F64)
    assert torch.count_nonzero(layer.get_delta_weight()) == 0
    layer.train()  # dropout on the adapter path must not touch the base path
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("kind", ADAPTED)
def test_merge_against_independent_reference(kind: str) -> None:
    base = _linear(1)
    w0 = base.weight.detach().clone()
    layer = _adapter(kind, base)
    randomize_trainable(layer, seed=2)
    layer.eval()
    x = torch.randn(7, 6, dtype=F64)
    ref = x.numpy() @ (w0.numpy() + _reference_delta(layer)).T + base.bias.detach().numpy()
    unmerged = layer(x).detach()
    np.testing.assert_allclose(unmerged.numpy(), ref, rtol=0, atol=1e-12)
    layer.merge()
    assert layer.merged
    np.testing.assert_allclose(base.weight.detach().numpy(), w0.numpy() + _reference_delta(layer), atol=1e-12)
    np.testing.assert_allclose(layer(x).detach().numpy(), ref, rtol=0, atol=1e-12)  # delta applied once
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach(), w0, rtol=0, atol=1e-13)
    torch.testing.assert_close(layer(x).detach(), unmerged, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_dropout_acts_on_adapter_input_only() -> None:
    base = _linear(3)
    layer = LoRALinear(base, 2, dropout=0.5)
    randomize_trainable(layer, seed=4)
    x = torch.randn(50, 6, dtype=F64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    noisy = layer(x)
    assert not torch.allclose(noisy, layer.eval()(x))
    mask_free = base(x)
    # every row differs from the base only through the (dropped-out) adapter path
    diff = (noisy - mask_free).detach()
    assert diff.abs().max() > 0


def test_adapter_argument_errors() -> None:
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(2, 2, 1), 1)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(_linear(0), 0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(_linear(0), 1, dropout=1.0)
    with pytest.raises(ValueError, match="divisible by n_heads=3"):
        MultiHeadLoRALinear(_linear(0), 3, 1)
    with pytest.raises(ValueError, match="head_embeddings"):
        HoRALinear(_linear(0), 2, 1, hyper_dim=2, head_embeddings=nn.Parameter(torch.zeros(2, 3, dtype=F64)))


def test_hora_generated_factors_equal_mh_lora() -> None:
    base = _linear(5)
    hora = HoRALinear(base, 2, rank=2, alpha=5.0, hyper_dim=3)
    randomize_trainable(hora, seed=6)
    a, b = hora.head_factors()
    mh = MultiHeadLoRALinear.from_factors(nn.Linear(6, 4, dtype=F64), a.detach(), b.detach(), alpha=5.0)
    with torch.no_grad():
        mh.base_layer.weight.copy_(base.weight)
        mh.base_layer.bias.copy_(base.bias)
    x = torch.randn(9, 6, dtype=F64)
    torch.testing.assert_close(mh(x), hora(x), rtol=0, atol=1e-13)


# ---------------------------------------------------------------------------- attention module
def _numpy_attention(module: MultiHeadAttention, x: np.ndarray) -> np.ndarray:
    """softmax(Q K^T / sqrt(dh)) V per head with explicit loops, weights rebuilt independently."""
    def weight(name: str) -> np.ndarray:
        proj = module.projection(name)
        lin = module.base_linear(name)
        w = lin.weight.detach().numpy().copy()
        if proj is not lin and not proj.merged:
            w = w + _reference_delta(proj)
        b = lin.bias.detach().numpy() if lin.bias is not None else np.zeros(w.shape[0])
        return w, b

    (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (weight(n) for n in "qkvo")
    q, k, v = x @ wq.T + bq, x @ wk.T + bk, x @ wv.T + bv
    n_tok, dh = x.shape[0], module.head_dim
    heads = []
    for h in range(module.n_heads):
        cols = slice(h * dh, (h + 1) * dh)
        kh, vh = k[:, cols], v[:, cols]
        if module.n_prefix:
            kh = np.concatenate([module.prefix_key[h].detach().numpy(), kh])
            vh = np.concatenate([module.prefix_value[h].detach().numpy(), vh])
        out = np.zeros((n_tok, dh))
        for i in range(n_tok):
            s = np.array([q[i, cols] @ kh[j] for j in range(kh.shape[0])]) / math.sqrt(dh)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i] = p @ vh
        heads.append(out)
    return np.concatenate(heads, axis=1) @ wo.T + bo


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
@pytest.mark.parametrize("n_prefix", [0, 2])
def test_module_equals_explicit_softmax_reference(kind: str, n_prefix: int) -> None:
    module = MultiHeadAttention(8, 2, adapter=kind, rank=2, hyper_dim=2, n_prefix=n_prefix, seed=3, dtype=F64)
    randomize_trainable(module, seed=4)
    x = torch.rand(2, 5, 8, dtype=F64) * 2 - 1
    out = module(x).detach().numpy()
    for b in range(2):
        np.testing.assert_allclose(out[b], _numpy_attention(module, x[b].numpy()), rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_from_torch_matches_multihead_attention(batch_first: bool, bias: bool) -> None:
    torch.manual_seed(7)
    mha = nn.MultiheadAttention(12, 3, bias=bias, batch_first=batch_first, dtype=F64).eval()
    with torch.no_grad():  # torch zero-initialises the biases; make them matter
        for p in mha.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = MultiHeadAttention.from_torch(mha)
    x = torch.randn(4, 6, 12, dtype=F64)  # (batch, tokens, E)
    xt = x if batch_first else x.transpose(0, 1)
    ref = mha(xt, xt, xt, need_weights=False)[0]
    ref = ref if batch_first else ref.transpose(0, 1)
    torch.testing.assert_close(ours(x), ref, rtol=0, atol=1e-12)
    weights = mha(xt, xt, xt, need_weights=True, average_attn_weights=False)[1]
    torch.testing.assert_close(ours.attention_weights(x), weights, rtol=0, atol=1e-12)
    # with zero-initialised adapters the adapted module still equals torch's layer
    for kind in ADAPTED:
        adapted = MultiHeadAttention.from_torch(mha, adapter=kind, rank=2)
        torch.testing.assert_close(adapted(x), ref, rtol=0, atol=1e-12)


def test_from_torch_rejects_unsupported_layouts() -> None:
    with pytest.raises(ValueError, match="kdim"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(4, 2, kdim=3, vdim=3))
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(4, 2, add_bias_kv=True))


@pytest.mark.parametrize("kind", ADAPTED)
def test_module_merge_and_zero_init(kind: str) -> None:
    module = MultiHeadAttention(8, 2, adapter=kind, rank=2, seed=11, dtype=F64)
    base = MultiHeadAttention(8, 2, adapter="none", seed=11, dtype=F64)
    x = torch.randn(3, 4, 8, dtype=F64)
    assert torch.equal(module(x), base(x))  # B factors start at zero
    randomize_trainable(module, seed=12)
    before = module(x).detach()
    assert (before - base(x)).abs().max() > 1e-3
    module.merge()
    torch.testing.assert_close(module(x), before, rtol=0, atol=1e-12)
    module.unmerge()
    for name in "qkvo":
        torch.testing.assert_close(module.base_linear(name).weight, base.base_linear(name).weight, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_only_adapter_parameters_receive_gradients(kind: str) -> None:
    module = MultiHeadAttention(8, 2, adapter=kind, rank=2, n_prefix=1, seed=5, dtype=F64)
    randomize_trainable(module, seed=6)
    module(torch.randn(3, 4, 8, dtype=F64)).pow(2).sum().backward()
    for name in "qkvo":
        lin = module.base_linear(name)
        assert not lin.weight.requires_grad and lin.weight.grad is None
        assert lin.bias.grad is None
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().max() > 0 for _, p in trainable)
    expected_names = {"none": set(), "lora": {"lora_A", "lora_B"}, "mh-lora": {"lora_A", "lora_B"},
                      "hora": {"shared_A", "shared_B", "generator_A", "generator_B"}}[kind]
    adapter_names = {n.split(".")[-1] for n, _ in trainable if n.startswith(("q_proj", "v_proj"))}
    assert adapter_names == expected_names
    assert not any(n.startswith(("k_proj", "out_proj")) for n, _ in trainable)


def test_parameter_counts_match_hand_count() -> None:
    # E = 8, H = 2 (dh = 4), r = 2, m = 1, adapters on Q and V, no prefix:
    #   lora:    per target B (8x2) + A (2x8) = 32            -> 64
    #   mh-lora: per target 2 heads x (B 4x2 + A 2x8) = 48    -> 96
    #   hora:    per target (A_0, B_0, G^A, G^B) = 16+8+16+8 = 48, embeddings 2x1 -> 98
    hand = {"none": 0, "lora": 64, "mh-lora": 96, "hora": 98}
    for kind, count in hand.items():
        module = MultiHeadAttention(8, 2, adapter=kind, rank=2, hyper_dim=1, seed=0)
        counts = module.trainable_parameters()
        assert counts["total"] == count == adapter_parameter_count(kind, 8, 2, 2, hyper_dim=1)
        assert counts["total"] == sum(p.numel() for p in module.parameters() if p.requires_grad)
    counts = MultiHeadAttention(8, 2, adapter="hora", rank=2, hyper_dim=1, n_prefix=3, seed=0).trainable_parameters()
    assert counts == {"head_embeddings": 2, "q": 48, "v": 48, "prefix": 2 * 2 * 3 * 4, "total": 98 + 48}


def test_module_argument_errors() -> None:
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(10, 3)
    with pytest.raises(ValueError, match="unknown adapter 'prefix'"):
        MultiHeadAttention(8, 2, adapter="prefix")
    with pytest.raises(ValueError, match="unknown target"):
        MultiHeadAttention(8, 2, adapter="lora", targets=("q", "w"))
    with pytest.raises(ValueError, match=r"expected \(\*batch, N, 8\)"):
        MultiHeadAttention(8, 2)(torch.zeros(3, 7))


def test_module_on_device(device: str) -> None:
    module = MultiHeadAttention(8, 2, adapter="hora", rank=2, n_prefix=1, seed=1, dtype=F64)
    randomize_trainable(module, seed=2)
    x = torch.randn(3, 4, 8, dtype=F64)
    expected = module(x).detach()
    moved = module.to(device)
    torch.testing.assert_close(moved(x.to(device)).detach().cpu(), expected, rtol=0, atol=1e-12)
