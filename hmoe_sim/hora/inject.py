"""Put LoRA, MH-LoRA or HoRA adapters on the attention of an existing (pretrained) model, in place.

Two kinds of attention block are found by walking the model's submodules:

* **Hugging Face BERT-family self-attention** -- a module with ``nn.Linear`` children named
  ``query``, ``key`` and ``value`` (``BertSelfAttention`` and its relatives). The targeted
  projections are wrapped in place by :class:`~hmoe_sim.hora.lora.LoRALinear`,
  :class:`~hmoe_sim.hora.lora.MultiHeadLoRALinear` or :class:`~hmoe_sim.hora.lora.HoRALinear`;
  the head count is read from the model's ``config.num_attention_heads`` (or from the
  block's own ``config`` / ``num_attention_heads`` when the model has no config).
* **``torch.nn.MultiheadAttention``** -- its packed ``in_proj_weight`` is a parameter, not a
  module, so it cannot be wrapped in place. The whole submodule is swapped for a
  :class:`MultiheadAttentionAdapter`: the package's
  :class:`~hmoe_sim.hora.attention.MultiHeadAttention` loaded with ``from_torch`` and called
  with ``nn.MultiheadAttention``'s signature (self-attention only).

``hora`` gives every attention block its own joint hypernetwork: one head-embedding table
``(H, m)`` per block, shared by the block's Q and V generators (``paper_notes/06`` section 2).
Everything that is not an adapter tensor is frozen.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from hmoe_sim._validation import check_choice, check_positive_float, check_positive_int
from hmoe_sim.hora.attention import MultiHeadAttention
from hmoe_sim.hora.lora import AdapterLinear, HoRALinear, LoRALinear, MultiHeadLoRALinear, set_merged

__all__ = ["INJECT_KINDS", "TARGET_ALIASES", "MultiheadAttentionAdapter", "attention_blocks", "inject_adapters",
           "merge_adapters", "trainable_parameters", "unmerge_adapters"]

INJECT_KINDS = ("lora", "mh-lora", "hora")
#: accepted target names and the projection they mean (Hugging Face names and the package's)
TARGET_ALIASES = {"query": "q", "key": "k", "value": "v", "q": "q", "k": "k", "v": "v"}
_HF_NAMES = {"q": "query", "k": "key", "v": "value"}
_KIND_OPTIONS = ("dropout", "hyper_dim", "seed")


class MultiheadAttentionAdapter(nn.Module):
    """Drop-in replacement of a ``torch.nn.MultiheadAttention`` that carries adapters.

    Holds the package's :class:`MultiHeadAttention` (``self.attention``, loaded with
    ``from_torch``) and is called like ``nn.MultiheadAttention``:
    ``forward(query, key, value, key_padding_mask, need_weights, attn_mask,
    average_attn_weights, is_causal) -> (output, weights or None)``, honouring ``batch_first``
    and applying dropout ``p`` to the attention weights in training mode, as torch does.
    Only self-attention is supported (``key`` and ``value`` must be the ``query`` tensor).

    ``in_proj_weight`` / ``in_proj_bias`` are read-only properties giving the *effective*
    packed weights (adapters included), so torch's fused inference paths (e.g. in
    ``nn.TransformerEncoderLayer``), which read them directly, compute the adapted layer too.

    Parameters
    ----------
    attention : MultiHeadAttention
        The adapted module (its projections must not include an adapted output projection).
    batch_first : bool
        Layout of the inputs, as in the replaced module.
    dropout : float
        Dropout probability on the attention weights (training mode only).
    """

    _qkv_same_embed_dim = True
    bias_k = None
    bias_v = None
    add_zero_attn = False
    merge_masks = nn.MultiheadAttention.merge_masks

    def __init__(self, attention: MultiHeadAttention, *, batch_first: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(attention, MultiHeadAttention):
            raise TypeError(f"attention must be a MultiHeadAttention, got {type(attention).__name__}")
        if attention.n_prefix:
            raise ValueError(f"attention has n_prefix={attention.n_prefix}; prefixes are not supported here")
        if "o" in attention.adapters():
            raise ValueError("an adapted output projection is not supported (out_proj must stay an nn.Linear)")
        self.attention = attention
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.embed_dim = attention.embed_dim
        self.num_heads = attention.n_heads
        self.head_dim = attention.head_dim

    @property
    def out_proj(self) -> nn.Linear:
        """The frozen output projection (``nn.Linear``)."""
        return self.attention.out_proj

    @property
    def in_proj_weight(self) -> torch.Tensor:
        """``(3E, E)`` effective packed Q, K, V weights (frozen weights plus adapter deltas)."""
        return torch.cat([self.attention.effective_weight(n) for n in "qkv"])

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        """``(3E,)`` packed Q, K, V biases, or ``None`` when the projections have none."""
        if self.attention.base_linear("q").bias is None:
            return None
        return torch.cat([self.attention.effective_bias(n) for n in "qkv"])

    def _score_bias(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                    is_causal: bool, x: torch.Tensor) -> torch.Tensor | None:
        """Additive ``(B, H, N, N)``-broadcastable score mask (``-inf`` where a bool mask is True)."""
        n_tokens = x.shape[-2]

        def additive(mask: torch.Tensor, name: str) -> torch.Tensor:
            if mask.dtype == torch.bool:
                return torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(mask, -math.inf)
            if not mask.is_floating_point():
                raise TypeError(f"{name} must be a bool or floating tensor, got dtype {mask.dtype}")
            return mask.to(dtype=x.dtype)

        bias: torch.Tensor | None = None
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=x.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                bias = additive(attn_mask, "attn_mask")
            elif attn_mask.dim() == 3:
                bias = additive(attn_mask, "attn_mask").unflatten(0, (-1, self.num_heads))
                if x.dim() == 2:
                    bias = bias.squeeze(0)
            else:
                raise ValueError(f"attn_mask has shape {tuple(attn_mask.shape)}; expected (N, N) or (B*H, N, N)")
        if key_padding_mask is not None:
            pad = additive(key_padding_mask, "key_padding_mask")
            pad = pad[..., None, :] if x.dim() == 2 else pad[:, None, None, :]
            bias = pad if bias is None else bias + pad
        return bias

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Self-attention with ``nn.MultiheadAttention``'s call signature and return value.

        Raises
        ------
        ValueError
            When ``key`` or ``value`` is a tensor other than ``query`` (cross-attention).
        """
        for name, other in (("key", key), ("value", value)):
            if other is not None and other is not query:
                raise ValueError(f"{name} is not the query tensor: only self-attention is supported after "
                                 "inject_adapters replaced an nn.MultiheadAttention")
        unbatched = query.dim() == 2
        x = query if (self.batch_first or unbatched) else query.transpose(0, 1)
        att = self.attention
        q = att._split_heads(att.q_proj(x))
        k = att._split_heads(att.k_proj(x))
        v = att._split_heads(att.v_proj(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        bias = self._score_bias(attn_mask, key_padding_mask, is_causal, x)
        if bias is not None:
            scores = scores + bias
        weights = torch.softmax(scores, dim=-1)
        dropped = nn.functional.dropout(weights, p=self.dropout, training=self.training) if self.dropout else weights
        out = att.out_proj((dropped @ v).transpose(-3, -2).flatten(-2))
        if not (self.batch_first or unbatched):
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=-3) if average_attn_weights else weights

    def extra_repr(self) -> str:
        return f"batch_first={self.batch_first}, dropout={self.dropout:g}"


def _hf_block(module: nn.Module) -> bool:
    """Whether ``module`` is BERT-family self-attention (``query``/``key``/``value`` linear children)."""
    children = dict(module.named_children())
    return all(isinstance(children.get(n), nn.Linear | AdapterLinear) for n in _HF_NAMES.values())


def attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention blocks :func:`inject_adapters` acts on, as ``(qualified name, module)`` in module order.

    A block is a Hugging Face BERT-family self-attention module, an ``nn.MultiheadAttention`` or
    a :class:`MultiheadAttentionAdapter` (an already swapped one); nothing inside a block is
    searched further.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found: list[tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module) -> None:
        if isinstance(module, nn.MultiheadAttention | MultiheadAttentionAdapter) or _hf_block(module):
            found.append((prefix, module))
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return found


def _head_count(model: nn.Module, block: nn.Module, name: str) -> int:
    for source in (getattr(model, "config", None), getattr(block, "config", None)):
        heads = getattr(source, "num_attention_heads", None)
        if heads is not None:
            return check_positive_int("config.num_attention_heads", heads)
    heads = getattr(block, "num_attention_heads", None)
    if heads is None:
        raise ValueError(f"cannot read the head count of attention block {name!r}: neither the model nor the block "
                         "has config.num_attention_heads, and the block has no num_attention_heads attribute")
    return check_positive_int("num_attention_heads", heads)


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    if isinstance(targets, str) or not isinstance(targets, Sequence) or not targets:
        raise ValueError(f"targets must be a non-empty sequence of projection names, got {targets!r}")
    out = []
    for t in targets:
        if t not in TARGET_ALIASES:
            raise ValueError(f"unknown target {t!r}; expected one of {sorted(TARGET_ALIASES)}")
        out.append(TARGET_ALIASES[t])
    if len(set(out)) != len(out):
        raise ValueError(f"targets {tuple(targets)!r} name a projection twice")
    return tuple(sorted(out, key="qkv".index))


def _check_layers(layers: Sequence[int] | None, n_blocks: int) -> list[int]:
    if layers is None:
        return list(range(n_blocks))
    if isinstance(layers, int) or not isinstance(layers, Sequence) or not layers:
        raise ValueError(f"layers must be None or a non-empty sequence of block indices, got {layers!r}")
    picked = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int) or not -n_blocks <= i < n_blocks:
            raise ValueError(f"layer index {i!r} is out of range for {n_blocks} attention blocks")
        picked.append(i % n_blocks)
    if len(set(picked)) != len(picked):
        raise ValueError(f"layers {tuple(layers)!r} name a block twice")
    return sorted(picked)


def _check_rank(kind: str, rank: int, in_features: int, out_features: int, head_dim: int, name: str) -> None:
    limit, what = (min(in_features, out_features), "the projection size") if kind == "lora" else (head_dim,
                                                                                                  "the head dimension")
    if rank > limit:
        raise ValueError(f"rank={rank} exceeds {what} {limit} of attention block {name!r} for kind {kind!r}")


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def inject_adapters(model: nn.Module, kind: str, rank: int, targets: Sequence[str] = ("query", "value"),
                    layers: Sequence[int] | None = None, alpha: float | None = None,
                    **kind_options: object) -> nn.Module:
    """Replace the targeted projections of every attention block by adapters, in place; freeze the rest.

    Parameters
    ----------
    model : torch.nn.Module
        A model holding Hugging Face BERT-family self-attention blocks and/or
        ``nn.MultiheadAttention`` submodules (a bare ``nn.MultiheadAttention`` cannot be
        swapped in place: wrap it in a container).
    kind : {"lora", "mh-lora", "hora"}
        Adapter kind (see :mod:`hmoe_sim.hora.lora`).
    rank : int
        Adapter rank (per head for ``mh-lora`` and ``hora``; at most the head dimension there,
        at most the projection size for ``lora``).
    targets : sequence of str
        Projections to adapt: ``"query"``/``"q"``, ``"key"``/``"k"``, ``"value"``/``"v"``.
    layers : sequence of int, optional
        Indices (negative allowed) into :func:`attention_blocks`; default all blocks.
    alpha : float, optional
        Scaling numerator (``scaling = alpha / rank``; default ``alpha = rank``).
    **kind_options
        ``dropout`` (adapter input dropout, default 0), ``seed`` (int: reproducible
        initialisation; default a random one), ``hyper_dim`` (``hora`` only: head-embedding
        dimension ``m``, default 1).

    Returns
    -------
    torch.nn.Module
        ``model`` itself, with only the adapter tensors trainable.

    Raises
    ------
    ValueError
        For an unknown kind or target, a rank above the limit, bad layer indices, a model with
        no attention block, a block that already has adapters, or an ``nn.MultiheadAttention``
        that ``MultiHeadAttention.from_torch`` does not support.
    TypeError
        For an unknown option.
    """
    kind = check_choice("kind", kind, INJECT_KINDS)
    rank = check_positive_int("rank", rank)
    if alpha is not None:
        alpha = check_positive_float("alpha", alpha)
    projections = _check_targets(targets)
    unknown = sorted(set(kind_options) - set(_KIND_OPTIONS))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for inject_adapters; expected some of {list(_KIND_OPTIONS)}")
    if "hyper_dim" in kind_options and kind != "hora":
        raise ValueError(f"hyper_dim applies to kind 'hora' only, got kind {kind!r}")
    hyper_dim = check_positive_int("hyper_dim", kind_options.get("hyper_dim", 1))
    dropout = float(kind_options.get("dropout", 0.0))  # range checked by the adapter layers
    seed = kind_options.get("seed")
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    else:
        generator.manual_seed(int(seed))

    blocks = attention_blocks(model)
    if not blocks:
        raise ValueError(f"no attention block found in {type(model).__name__}: expected Hugging Face BERT-family "
                         "self-attention (query/key/value nn.Linear children) or nn.MultiheadAttention submodules")
    chosen = [blocks[i] for i in _check_layers(layers, len(blocks))]
    for name, block in chosen:
        if isinstance(block, MultiheadAttentionAdapter) or any(isinstance(m, AdapterLinear) for m in block.modules()):
            raise ValueError(f"attention block {name!r} already has adapters")
        if isinstance(block, nn.MultiheadAttention) and not name:
            raise ValueError("model is itself an nn.MultiheadAttention, which cannot be replaced in place; "
                             "wrap it in a container module or use MultiHeadAttention.from_torch")

    for p in model.parameters():
        p.requires_grad_(False)
    for name, block in chosen:
        if isinstance(block, nn.MultiheadAttention):
            _check_rank(kind, rank, block.embed_dim, block.embed_dim, block.head_dim, name)
            block_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            swapped = MultiHeadAttention.from_torch(block, adapter=kind, rank=rank, alpha=alpha, dropout=dropout,
                                                    hyper_dim=hyper_dim, targets=projections, seed=block_seed)
            _set_submodule(model, name, MultiheadAttentionAdapter(swapped, batch_first=block.batch_first,
                                                                  dropout=block.dropout).train(block.training))
            continue
        heads = _head_count(model, block, name)
        embeddings = None
        for proj in projections:
            base = getattr(block, _HF_NAMES[proj])
            if base.out_features % heads:
                raise ValueError(f"{name}.{_HF_NAMES[proj]} has {base.out_features} outputs, not divisible by "
                                 f"{heads} heads")
            _check_rank(kind, rank, base.in_features, base.out_features, base.out_features // heads, name)
            layer: AdapterLinear
            if kind == "lora":
                layer = LoRALinear(base, rank, alpha, dropout, generator=generator)
            elif kind == "mh-lora":
                layer = MultiHeadLoRALinear(base, heads, rank, alpha, dropout, generator=generator)
            else:
                if embeddings is None:
                    w = base.weight
                    embeddings = nn.Parameter(torch.randn((heads, hyper_dim), generator=generator,
                                                          dtype=w.dtype).to(w.device))
                layer = HoRALinear(base, heads, rank, alpha, dropout, hyper_dim=hyper_dim,
                                   head_embeddings=embeddings, generator=generator)
            setattr(block, _HF_NAMES[proj], layer.train(base.training))
    return model


def _adapter_layers(model: nn.Module) -> dict[str, AdapterLinear]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AdapterLinear)}
    if not layers:
        raise ValueError(f"{type(model).__name__} holds no adapters; call inject_adapters first")
    return layers


def merge_adapters(model: nn.Module) -> nn.Module:
    """Merge every adapter's ``delta_W`` into its frozen weight (see :meth:`AdapterLinear.merge`).

    Raises
    ------
    ValueError
        If the model holds no adapters.
    RuntimeError
        If an adapter is already merged (checked before anything is merged).
    """
    set_merged(_adapter_layers(model), True, owner=type(model).__name__, undo="unmerge_adapters")
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapters`: restore every frozen weight exactly (see :meth:`AdapterLinear.unmerge`).

    Raises
    ------
    ValueError
        If the model holds no adapters.
    RuntimeError
        If an adapter is not merged (checked before anything is unmerged).
    """
    set_merged(_adapter_layers(model), False, owner=type(model).__name__, undo="unmerge_adapters")
    return model


_PROJECTION_OF_ATTR = {"query": "q", "key": "k", "value": "v", "q_proj": "q", "k_proj": "k", "v_proj": "v",
                       "out_proj": "o"}


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable scalars by component, each tensor counted once.

    Returns
    -------
    dict of str to int
        ``"q"``, ``"k"``, ``"v"`` (``"o"``): adapter factors on that projection, summed over
        blocks; ``"head_embeddings"``: the ``hora`` embedding tables (one per block, shared by
        its targets); ``"other"``: trainable tensors outside adapters (0 right after
        :func:`inject_adapters`); ``"total"``: their sum. Components with no tensors are omitted,
        except ``"other"`` and ``"total"``.
    """
    counts: dict[str, int] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, AdapterLinear):
            continue
        proj = _PROJECTION_OF_ATTR.get(name.rpartition(".")[2], "other")
        for pname, p in module.adapter_parameters().items():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            key = "head_embeddings" if pname == "head_embeddings" else proj
            counts[key] = counts.get(key, 0) + p.numel()
    counts["other"] = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in seen)
    counts["total"] = sum(counts.values())
    return counts
