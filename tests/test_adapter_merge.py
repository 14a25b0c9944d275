"""Adapter merge state: exact unmerge, state-dict round trips, backward and repeated calls."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from adapter_helpers import randomize_trainable
from torch import nn

from hmoe_sim.hora import (
    AdapterLinear,
    HoRALinear,
    LoRALinear,
    MultiHeadAttention,
    MultiHeadLoRALinear,
    inject_adapters,
    merge_adapters,
    unmerge_adapters,
)

F64 = torch.float64
KINDS = ("lora", "mh-lora", "hora")


def _layer(kind: str, seed: int = 0) -> AdapterLinear:
    torch.manual_seed(seed)
    base = nn.Linear(6, 4, dtype=F64)
    gen = torch.Generator().manual_seed(seed + 1)
    if kind == "lora":
        layer: AdapterLinear = LoRALinear(base, 2, alpha=3.0, generator=gen)
    elif kind == "mh-lora":
        layer = MultiHeadLoRALinear(base, 2, 2, alpha=3.0, generator=gen)
    else:
        layer = HoRALinear(base, 2, 2, alpha=3.0, hyper_dim=2, generator=gen)
    randomize_trainable(layer, seed + 2)
    return layer


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


class _Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, dtype=F64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize("kind", KINDS)
def test_unmerge_after_changing_adapter_restores_exact_base(kind: str) -> None:
    layer = _layer(kind)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    randomize_trainable(layer, seed=9, scale=2.0)  # the adapter changes while merged
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)
    assert not layer.merged


@pytest.mark.parametrize("kind", KINDS)
def test_repeated_merge_cycles_keep_base_bit_exact(kind: str) -> None:
    layer = _layer(kind)
    w0 = layer.base_layer.weight.detach().clone()
    for _ in range(5):
        layer.merge()
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)


@pytest.mark.parametrize("kind", KINDS)
def test_double_merge_and_unmerge_when_unmerged_raise(kind: str) -> None:
    layer = _layer(kind)
    w0 = layer.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    merged_w = layer.base_layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    assert torch.equal(layer.base_layer.weight, merged_w)  # the failed merge changed nothing
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target_merged", [False, True])
def test_merged_state_dict_loads_with_its_merge_state(kind: str, target_merged: bool) -> None:
    source = _layer(kind, seed=0)
    w0 = source.base_layer.weight.detach().clone()
    x = torch.randn(5, 6, dtype=F64)
    with torch.no_grad():
        expected = source(x)
    source.merge()
    state = _roundtrip(source.state_dict())
    assert bool(state["merge_state"]) and torch.equal(state["merge_base_weight"], w0)

    target = _layer(kind, seed=10)  # other weights
    if target_merged:
        target.merge()
    target.load_state_dict(state)
    assert target.merged
    with torch.no_grad():
        torch.testing.assert_close(target(x), expected, rtol=0, atol=1e-12)  # update applied once
    target.unmerge()
    assert torch.equal(target.base_layer.weight, w0)
    with torch.no_grad():
        torch.testing.assert_close(target(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_unmerged_state_dict_into_merged_model(kind: str) -> None:
    source = _layer(kind, seed=0)
    x = torch.randn(5, 6, dtype=F64)
    with torch.no_grad():
        expected = source(x)
    target = _layer(kind, seed=10)
    target.merge()
    target.load_state_dict(source.state_dict())
    assert not target.merged
    with torch.no_grad():
        torch.testing.assert_close(target(x), expected, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="not merged"):
        target.unmerge()


def test_inconsistent_merge_state_is_reported() -> None:
    source = _layer("lora")
    source.merge()
    state = source.state_dict()
    del state["merge_base_weight"]
    with pytest.raises(RuntimeError, match="says the adapter is merged"):
        _layer("lora", seed=3).load_state_dict(state)
    legacy = _layer("lora").state_dict()
    del legacy["merge_state"]  # saved before the merge state existed
    with pytest.raises(RuntimeError, match="merge_state"):
        _layer("lora").load_state_dict(legacy)
    target = _layer("lora", seed=3)
    target.load_state_dict(legacy, strict=False)
    assert not target.merged


@pytest.mark.parametrize("kind", KINDS)
def test_backward_through_merged_layer_raises_clearly(kind: str) -> None:
    layer = _layer(kind)
    x = torch.randn(3, 6, dtype=F64)
    layer.merge()
    out = layer(x)  # the forward pass itself works, in training mode too
    with pytest.raises(RuntimeError, match=r"adapter is merged; call unmerge\(\) before training"):
        out.sum().backward()
    with torch.no_grad():
        assert not layer(x).requires_grad
    for p in layer.adapter_parameters().values():
        p.requires_grad_(False)
    assert not layer(x).requires_grad  # frozen adapters: no guard
    for p in layer.adapter_parameters().values():
        p.requires_grad_(True)
    layer.unmerge()
    layer(x).sum().backward()
    assert all(p.grad is not None for p in layer.adapter_parameters().values())


@pytest.mark.parametrize("kind", KINDS)
def test_module_state_dict_round_trip_and_exact_unmerge(kind: str) -> None:
    options = {"hyper_dim": 2} if kind == "hora" else {}
    source = MultiHeadAttention(8, 2, adapter=kind, rank=2, seed=0, dtype=F64, **options)
    randomize_trainable(source, seed=1)
    frozen = {n: p.detach().clone() for n, p in source.named_parameters() if not p.requires_grad}
    x = torch.randn(2, 5, 8, dtype=F64)
    with torch.no_grad():
        expected = source(x)
    source.merge()
    target = MultiHeadAttention(8, 2, adapter=kind, rank=2, seed=4, dtype=F64, **options)
    target.load_state_dict(_roundtrip(source.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(target(x), expected, rtol=0, atol=1e-12)
    randomize_trainable(source, seed=2)
    source.unmerge()
    assert all(torch.equal(p, frozen[n]) for n, p in source.named_parameters() if not p.requires_grad)
    with pytest.raises(RuntimeError, match="not merged"):
        source.unmerge()


@pytest.mark.parametrize("kind", KINDS)
def test_injected_model_merge_state(kind: str) -> None:
    options = {"hyper_dim": 2} if kind == "hora" else {}
    source = _Holder()
    inject_adapters(source, kind, 2, seed=3, **options)
    randomize_trainable(source, seed=4)
    frozen = {n: p.detach().clone() for n, p in source.named_parameters() if not p.requires_grad}
    fresh = copy.deepcopy(source)
    x = torch.randn(2, 5, 8, dtype=F64)
    with torch.no_grad():
        expected = source(x)
    merge_adapters(source)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_adapters(source)
    fresh.load_state_dict(source.state_dict())  # merged -> unmerged model: loads as merged
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-12)
    with pytest.raises(RuntimeError, match="adapter is merged"):
        source(x).sum().backward()
    randomize_trainable(source, seed=5)
    unmerge_adapters(source)
    assert all(torch.equal(p, frozen[n]) for n, p in source.named_parameters() if not p.requires_grad)
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_adapters(source)
    unmerge_adapters(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-12)
