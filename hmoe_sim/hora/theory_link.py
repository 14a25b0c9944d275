"""From an attention module to the regression functions of the theory.

The theory (theory.md sections 1 and 5) looks at one output row of the layer read out by a
fixed vector ``u``: with tokens ``x_1..x_N`` stacked as ``X in R^{N E}``,

.. math::

    f(X) = u^\\top \\mathrm{MHA}(X)_1
         = \\sum_h \\sum_j \\mathrm{softmax}_j(s_{hj}(X))\\, c_h^\\top v_{hj}(X) + u^\\top b^O,
    \\qquad c_h = (W^O_h)^\\top u,

a two-level mixture whose first level is the heads and whose second level is the tokens
(plus any prefix key/value pairs). :func:`layer_regression_function` computes it from the
module's per-head matrices by that formula (an implementation independent of the module's
``forward``); :func:`row_one_readout` reads it off the module's forward pass.

Exact maps to :mod:`hmoe_sim.models.hmoe`:

* :func:`to_frozen_attention` -- LoRA, MH-LoRA and HoRA adapters on ``W^Q``/``W^V`` only
  change the *known* experts (quadratic gating scores and linear experts), so the adapted
  layer is again a frozen layer: its ``HMoE(n_adapters=0)`` equals ``f`` exactly.
* :func:`to_hmoe` -- prefix keys/values are the adapter atoms of the adopted HMoE (linear
  gating ``beta_1^T X + beta_0``, affine expert ``a^T X + b``): a prefix ``(p_K, p_V)`` of
  head ``h`` is the atom ``beta_1 = E_1^T W^Q_h (p_K - b^K_h) / sqrt(dh)``, ``beta_0 = 0``,
  ``a = 0``, ``b = H c_h^T p_V``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hmoe_sim.hora.attention import MultiHeadAttention
from hmoe_sim.models.base import Params, softmax_mix
from hmoe_sim.models.hmoe import FrozenAttention, HMoE

__all__ = ["HeadWeights", "head_weights", "layer_regression_function", "row_one_readout", "to_frozen_attention",
           "to_hmoe"]


@dataclass(frozen=True)
class HeadWeights:
    """Per-head matrices of a module in the theory's layout (``q = x W^Q_h``).

    Attributes
    ----------
    query, key, value : torch.Tensor
        ``(H, E, dh)`` effective projections (adapters included).
    query_bias, key_bias, value_bias : torch.Tensor
        ``(H, dh)``.
    output : torch.Tensor
        ``(H, dh, E)`` blocks of the output projection: ``MHA = sum_h o_h output_h + output_bias``.
    output_bias : torch.Tensor
        ``(E,)``.
    prefix_key, prefix_value : torch.Tensor
        ``(H, P, dh)`` (``P = 0`` without prefixes).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    query_bias: torch.Tensor
    key_bias: torch.Tensor
    value_bias: torch.Tensor
    output: torch.Tensor
    output_bias: torch.Tensor
    prefix_key: torch.Tensor
    prefix_value: torch.Tensor


def _check_module(module: object) -> MultiHeadAttention:
    if not isinstance(module, MultiHeadAttention):
        raise TypeError(f"module must be a hmoe_sim.hora.MultiHeadAttention, got {type(module).__name__}")
    return module


def head_weights(module: MultiHeadAttention) -> HeadWeights:
    """Split the module's effective weights per head (autograd graph kept)."""
    m = _check_module(module)
    h, dh, e = m.n_heads, m.head_dim, m.embed_dim
    per_head = lambda w: w.reshape(h, dh, e).transpose(1, 2)  # noqa: E731
    empty = m.base_linear("q").weight.new_zeros((h, 0, dh))
    return HeadWeights(
        query=per_head(m.effective_weight("q")),
        key=per_head(m.effective_weight("k")),
        value=per_head(m.effective_weight("v")),
        query_bias=m.effective_bias("q").reshape(h, dh),
        key_bias=m.effective_bias("k").reshape(h, dh),
        value_bias=m.effective_bias("v").reshape(h, dh),
        output=m.effective_weight("o").T.reshape(h, dh, e),
        output_bias=m.effective_bias("o"),
        prefix_key=m.prefix_key if m.prefix_key is not None else empty,
        prefix_value=m.prefix_value if m.prefix_value is not None else empty,
    )


def _tokens(module: MultiHeadAttention, X: torch.Tensor) -> torch.Tensor:
    e = module.embed_dim
    if not isinstance(X, torch.Tensor) or X.dim() < 2 or X.shape[-1] % e or X.shape[-1] == 0:
        raise ValueError(f"X has shape {tuple(getattr(X, 'shape', ()))}; expected (*batch, n, N * {e}) "
                         "(tokens stacked)")
    return X.unflatten(-1, (X.shape[-1] // e, e))


def _check_readout(module: MultiHeadAttention, readout: torch.Tensor) -> torch.Tensor:
    if not isinstance(readout, torch.Tensor) or tuple(readout.shape) != (module.embed_dim,):
        raise ValueError(f"readout has shape {tuple(getattr(readout, 'shape', ()))}; expected ({module.embed_dim},)")
    return readout


def layer_regression_function(module: MultiHeadAttention, X: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
    """``f(X) = u^T MHA(X)_1`` by the mixture-of-experts formula of theory.md section 1.

    Parameters
    ----------
    module : MultiHeadAttention
        Frozen weights plus adapters (merged or not) and optional prefixes.
    X : torch.Tensor
        ``(*batch, n, N E)`` inputs, tokens stacked (``x_1`` first).
    readout : torch.Tensor
        ``(E,)`` readout ``u``.

    Returns
    -------
    torch.Tensor
        ``(*batch, n)``.
    """
    w = head_weights(module)
    u = _check_readout(module, readout)
    tokens = _tokens(module, X)
    c = torch.einsum("hve,e->hv", w.output, u)
    q1 = torch.einsum("...e,hek->...hk", tokens[..., 0, :], w.query) + w.query_bias
    keys = torch.einsum("...te,hek->...htk", tokens, w.key) + w.key_bias.unsqueeze(-2)
    scale = math.sqrt(module.head_dim)
    scores = torch.einsum("...hk,...htk->...ht", q1, keys) / scale
    experts = torch.einsum("...te,hev,hv->...ht", tokens, w.value, c) + (w.value_bias * c).sum(-1, keepdim=True)
    prefix_scores = torch.einsum("...hk,hpk->...hp", q1, w.prefix_key) / scale
    prefix_experts = torch.einsum("hpv,hv->hp", w.prefix_value, c).expand_as(prefix_scores)
    heads = softmax_mix(torch.cat([prefix_scores, scores], dim=-1), torch.cat([prefix_experts, experts], dim=-1))
    return heads.sum(-1) + u @ w.output_bias


def row_one_readout(module: MultiHeadAttention, X: torch.Tensor, readout: torch.Tensor) -> torch.Tensor:
    """``u^T MHA(X)_1`` through the module's forward pass; same shapes as :func:`layer_regression_function`."""
    u = _check_readout(_check_module(module), readout)
    return module(_tokens(module, X))[..., 0, :] @ u


def _require_zero(name: str, t: torch.Tensor) -> None:
    if bool((t != 0).any()):
        raise ValueError(f"{name} is nonzero (max |entry| {t.abs().max().item():.3g}); the adopted HMoE has no "
                         f"such term -- build the module with bias=False or zero that bias")


def to_frozen_attention(module: MultiHeadAttention, readout: torch.Tensor) -> FrozenAttention:
    """The module's known experts as a :class:`FrozenAttention` (adapters merged in, exact).

    ``HMoE(to_frozen_attention(m, u), n_tokens=N, n_adapters=0)`` computes
    ``(1/H) sum_h c'_h^T o_h`` with ``c'_h = H (W^O_h)^T u``, which equals ``u^T MHA(X)_1``.

    Raises
    ------
    ValueError
        If the query, value or output bias is nonzero (the key bias cancels in the softmax
        and is allowed).
    """
    w = head_weights(module)
    u = _check_readout(module, readout)
    for name in ("query_bias", "value_bias", "output_bias"):
        _require_zero(name, getattr(w, name))
    detach = lambda t: t.detach().clone()  # noqa: E731
    c = module.n_heads * torch.einsum("hve,e->hv", w.output, u)
    return FrozenAttention(query=detach(w.query), key=detach(w.key), value=detach(w.value), readout=detach(c))


def to_hmoe(module: MultiHeadAttention, readout: torch.Tensor, n_tokens: int) -> tuple[HMoE, Params]:
    """The module as a non-shared :class:`HMoE` with its prefixes as adapter atoms (exact).

    Parameters
    ----------
    module : MultiHeadAttention
        Zero query/value/output biases; any adapters on ``W^Q``/``W^V``; ``P = n_prefix``.
    readout : torch.Tensor
        ``(E,)``.
    n_tokens : int
        ``N``; the HMoE's inputs are ``X in R^{N E}``.

    Returns
    -------
    (HMoE, dict of torch.Tensor)
        ``HMoE(n_adapters=P, structure="nonshared", first_level="uniform")`` and its
        parameters; ``model.predict(params, X)`` equals ``u^T MHA(X)_1``.
    """
    frozen = to_frozen_attention(module, readout)
    model = HMoE(frozen, n_tokens=n_tokens, n_adapters=module.n_prefix, structure="nonshared", first_level="uniform")
    w = head_weights(module)
    h, p, e = module.n_heads, module.n_prefix, module.embed_dim
    with torch.no_grad():
        slope = torch.einsum("hek,hpk->hpe", w.query, w.prefix_key - w.key_bias.unsqueeze(1))
        beta1 = slope.new_zeros((h, p, model.input_dim))
        beta1[..., :e] = slope / math.sqrt(module.head_dim)
        params = {
            "beta0": slope.new_zeros((h, p)),
            "beta1": beta1,
            "a": slope.new_zeros((h, p, model.input_dim)),
            "b": torch.einsum("hpv,hv->hp", w.prefix_value, frozen.readout),
        }
    return model, params
