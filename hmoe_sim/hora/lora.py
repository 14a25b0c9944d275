"""Low-rank adapters around a frozen ``nn.Linear`` (peft conventions, written here).

Three adapters share one contract (:class:`AdapterLinear`): the wrapped base layer is
frozen, the adapter adds ``delta_W = scaling * (low-rank product)`` to its weight, ``B``
factors start at zero so the adapted layer starts equal to the base, dropout acts on the
adapter's input only, and ``merge()`` / ``unmerge()`` move ``delta_W`` into and out of the
base weight.

Merge state. ``merge()`` keeps an exact copy of the base weight and ``unmerge()`` restores
that copy bit for bit (it does not subtract the *current* ``delta_W``, which may have changed
since the merge). Merging twice or unmerging an unmerged adapter raises ``RuntimeError``.
The merge state (flag and saved base weight) is part of ``state_dict()`` under the keys
``merge_state`` and ``merge_base_weight``, so loading a state dict restores the source's
state whatever the target's was (a merged source gives a merged target that unmerges to the
right base weight). Gradients do not flow through a merged adapter: with grad enabled and
trainable adapter tensors, the forward output carries a guard whose backward raises
``RuntimeError`` ("adapter is merged; call unmerge() before training").

* :class:`LoRALinear` -- one rank-``r`` adapter on the whole projection:
  ``delta_W = (alpha / r) B A`` with ``A (r, in)``, ``B (out, r)``.
* :class:`MultiHeadLoRALinear` -- MH-LoRA: the ``out`` rows are split into ``H`` heads of
  ``out / H`` rows and head ``h`` gets its own ``A_h (r, in)``, ``B_h (out/H, r)``.
* :class:`HoRALinear` -- HoRA: the per-head factors are *generated* by a joint linear
  hypernetwork from head embeddings ``e_h (m,)``: ``A_h = A_0 + sum_k e_hk G^A_k`` and
  ``B_h = B_0 + sum_k e_hk G^B_k``. ``(A_0, B_0)`` is the shared low-rank adapter and
  ``e_h`` the head-specific input (the design is a reconstruction, documented in
  ``paper_notes/06_hora_layers.md``).
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
from torch import nn

from hmoe_sim._validation import check_finite_tensor, check_positive_float, check_positive_int

__all__ = ["AdapterLinear", "LoRALinear", "MultiHeadLoRALinear", "HoRALinear", "generated_head_factors",
           "per_head_delta_weight", "per_head_output", "set_merged"]


def _check_base(base: object) -> nn.Linear:
    if not isinstance(base, nn.Linear):
        raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
    check_finite_tensor("base.weight", base.weight)
    if base.bias is not None:
        check_finite_tensor("base.bias", base.bias)
    return base


def _check_dropout(dropout: object) -> float:
    p = check_positive_float("dropout", dropout, allow_zero=True)
    if p >= 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
    return p


def _uniform(shape: tuple[int, ...], bound: float, like: torch.Tensor,
             generator: torch.Generator | None) -> nn.Parameter:
    """``U(-bound, bound)`` entries (the kaiming-uniform(a=sqrt 5) bound ``1/sqrt(fan_in)`` of peft)."""
    t = torch.rand(shape, generator=generator, dtype=like.dtype) * (2 * bound) - bound
    return nn.Parameter(t.to(like.device))


class _MergedGuard(torch.autograd.Function):
    """Identity in the forward pass; its backward raises (no gradient reaches a merged adapter)."""

    @staticmethod
    def forward(ctx: object, out: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return out.clone()

    @staticmethod
    def backward(ctx: object, *grads: torch.Tensor) -> tuple[None, ...]:
        raise RuntimeError("adapter is merged; call unmerge() before training (or freeze the adapter tensors "
                           "with requires_grad_(False) to train other parts of the model)")


def _zeros(shape: tuple[int, ...], like: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(torch.zeros(shape, dtype=like.dtype, device=like.device))


class AdapterLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank weight update ``delta_W`` (abstract).

    Parameters
    ----------
    base : torch.nn.Linear
        The pretrained layer; its parameters are frozen (``requires_grad=False``).
    rank : int
        Rank ``r`` of the adapter (per head for the per-head kinds).
    alpha : float, optional
        Scaling numerator; ``scaling = alpha / rank`` (default ``alpha = rank``: scaling 1).
    dropout : float
        Dropout probability applied to the adapter's input (not to the base path).

    Attributes
    ----------
    merged : bool
        Whether ``delta_W`` currently sits inside ``base_layer.weight`` (read-only; change it
        with :meth:`merge` / :meth:`unmerge` or by loading a state dict).

    Notes
    -----
    While merged, the layer holds an exact copy of the unmerged base weight (a non-persistent
    buffer, saved in ``state_dict()`` under ``merge_base_weight`` next to the flag
    ``merge_state``); :meth:`unmerge` restores it bit for bit.
    """

    _MERGE_FLAG = "merge_state"
    _MERGE_WEIGHT = "merge_base_weight"

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = _check_base(base)
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.rank = check_positive_int("rank", rank)
        self.alpha = check_positive_float("alpha", float(rank) if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        self.dropout_p = _check_dropout(dropout)
        self.lora_dropout = nn.Dropout(self.dropout_p) if self.dropout_p > 0 else nn.Identity()
        self.register_buffer("_unmerged_weight", None, persistent=False)

    @property
    def merged(self) -> bool:
        """Whether ``delta_W`` currently sits inside ``base_layer.weight`` (a saved base weight is held)."""
        return self._unmerged_weight is not None

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @abstractmethod
    def get_delta_weight(self) -> torch.Tensor:
        """``delta_W`` in ``nn.Linear`` layout ``(out, in)``, scaling included."""

    @abstractmethod
    def _adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        """``x delta_W^T`` computed through the low-rank factors (``x`` already dropped out)."""

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies: ``W + delta_W`` (equal to ``base_layer.weight`` when merged)."""
        w = self.base_layer.weight
        return w if self.merged else w + self.get_delta_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(*, in_features)`` -> ``(*, out_features)``.

        Raises
        ------
        ValueError
            If the last axis of ``x`` is not ``in_features`` wide (naming both widths).
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            width = x.shape[-1] if x.dim() else None
            raise ValueError(f"{type(self).__name__} expects inputs of width in_features={self.in_features} "
                             f"(last axis), got width {width} (shape {tuple(x.shape)})")
        out = self.base_layer(x)
        if self.merged:
            params = [p for p in self.adapter_parameters().values() if p.requires_grad]
            if params and torch.is_grad_enabled():
                return _MergedGuard.apply(out, *params)
            return out
        return out + self._adapter_output(self.lora_dropout(x))

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``delta_W`` to the base weight once (the forward pass then skips the adapter).

        An exact copy of the base weight is kept for :meth:`unmerge`.

        Raises
        ------
        RuntimeError
            If already merged, or if the merged weight would contain non-finite values.
        """
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is already merged; call unmerge() first")
        weight = self.base_layer.weight
        new = weight + self.get_delta_weight()
        if not bool(torch.isfinite(new).all()):
            raise RuntimeError(f"merging {type(self).__name__} would give non-finite weights")
        self._unmerged_weight = weight.detach().clone()
        weight.copy_(new)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact base weight saved by :meth:`merge` (bit for bit).

        The adapter tensors may have changed since the merge; the restored weight is the one
        the merge started from, not ``merged weight - current delta_W``.

        Raises
        ------
        RuntimeError
            If the adapter is not merged.
        """
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__} is not merged; nothing to unmerge")
        self.base_layer.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + self._MERGE_FLAG] = torch.tensor(self.merged)
        if self.merged:
            saved = self._unmerged_weight
            destination[prefix + self._MERGE_WEIGHT] = saved if keep_vars else saved.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        """Load the merge state with the tensors: the layer ends merged iff the source was.

        A state dict without ``merge_state`` (saved before the merge state existed) reports
        it as a missing key and, when not strict, loads as unmerged.
        """
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        flag_key, weight_key = prefix + self._MERGE_FLAG, prefix + self._MERGE_WEIGHT
        for key in (flag_key, weight_key):
            if key in unexpected_keys:
                unexpected_keys.remove(key)
        if flag_key not in state_dict:
            if strict:
                missing_keys.append(flag_key)
            merged, saved = False, None
        else:
            merged = bool(state_dict[flag_key])
            saved = state_dict.get(weight_key)
        weight = self.base_layer.weight
        if merged and (saved is None or tuple(saved.shape) != tuple(weight.shape)):
            error_msgs.append(f"{prefix or type(self).__name__}: the state dict says the adapter is merged but "
                              f"its saved base weight {weight_key!r} is missing or does not have shape "
                              f"{tuple(weight.shape)}")
            return
        if not merged and saved is not None:
            error_msgs.append(f"{prefix or type(self).__name__}: the state dict holds {weight_key!r} but says the "
                              "adapter is not merged")
            return
        with torch.no_grad():
            self._unmerged_weight = saved.detach().to(device=weight.device, dtype=weight.dtype).clone() \
                if merged else None

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable adapter tensors by name (shared tensors listed once)."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"scaling={self.scaling:g}, dropout={self.dropout_p:g}, merged={self.merged}")


def set_merged(layers: dict[str, AdapterLinear], merged: bool, *, owner: str, undo: str) -> None:
    """Merge (``merged=True``) or unmerge every adapter of a model, all or none.

    Every adapter's state is checked before any is changed, so a refused call leaves nothing
    half-merged.

    Parameters
    ----------
    layers : dict of str to AdapterLinear
        The model's adapters by name.
    merged : bool
        The state to move every adapter into.
    owner : str
        The model, as named in the error message.
    undo : str
        The call that undoes a merge, as named in the error message.

    Raises
    ------
    RuntimeError
        If an adapter is already in the requested state.
    """
    already = sorted(name for name, layer in layers.items() if layer.merged == merged)
    if already:
        state = f"already merged; call {undo} first" if merged else "not merged; nothing to unmerge there"
        raise RuntimeError(f"{len(already)} of the {len(layers)} adapters of {owner} ({already}) are {state}")
    for layer in layers.values():
        if merged:
            layer.merge()
        else:
            layer.unmerge()


def per_head_delta_weight(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``delta_W (out, in)`` of per-head factors ``A (H, r, in)``, ``B (H, out/H, r)``: head ``h`` fills
    rows ``h*dh:(h+1)*dh`` with ``scaling * B_h A_h``."""
    heads, head_dim, in_features = b.shape[0], b.shape[1], a.shape[-1]
    return scaling * torch.einsum("hdr,hri->hdi", b, a).reshape(heads * head_dim, in_features)


def per_head_output(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``x delta_W^T`` of :func:`per_head_delta_weight` computed through the factors: ``(*, in)`` -> ``(*, out)``."""
    low = torch.einsum("...i,hri->...hr", x, a)
    out = torch.einsum("...hr,hdr->...hd", low, b)
    return scaling * out.reshape(*x.shape[:-1], b.shape[0] * b.shape[1])


def generated_head_factors(embeddings: torch.Tensor, shared_A: torch.Tensor, generator_A: torch.Tensor,
                           shared_B: torch.Tensor, generator_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HoRA's joint linear hypernetwork: ``A_h = A_0 + sum_k e_hk G^A_k``, ``B_h = B_0 + sum_k e_hk G^B_k``.

    Parameters
    ----------
    embeddings : torch.Tensor
        Head embeddings ``e (H, m)``.
    shared_A, generator_A : torch.Tensor
        ``A_0 (r, in)`` and ``G^A (m, r, in)``.
    shared_B, generator_B : torch.Tensor
        ``B_0 (out/H, r)`` and ``G^B (m, out/H, r)``.

    Returns
    -------
    (A, B)
        Per-head factors ``A (H, r, in)`` and ``B (H, out/H, r)``.
    """
    a = shared_A + torch.einsum("hm,mri->hri", embeddings, generator_A)
    b = shared_B + torch.einsum("hm,mdr->hdr", embeddings, generator_B)
    return a, b


class LoRALinear(AdapterLinear):
    """LoRA on the whole projection: ``y = x W^T + b + (alpha/r) dropout(x) A^T B^T``.

    Parameters
    ----------
    base, rank, alpha, dropout
        See :class:`AdapterLinear`.
    generator : torch.Generator, optional
        Random source for the ``U(-1/sqrt(in), 1/sqrt(in))`` initialisation of ``lora_A``.

    Attributes
    ----------
    lora_A : nn.Parameter
        ``(r, in)``.
    lora_B : nn.Parameter
        ``(out, r)``, zero-initialised.

    Examples
    --------
    >>> layer = LoRALinear(torch.nn.Linear(4, 3), rank=2)
    >>> bool(torch.equal(layer.effective_weight(), layer.base_layer.weight))
    True
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 *, generator: torch.Generator | None = None) -> None:
        super().__init__(base, rank, alpha, dropout)
        w = self.base_layer.weight
        self.lora_A = _uniform((self.rank, self.in_features), 1 / math.sqrt(self.in_features), w, generator)
        self.lora_B = _zeros((self.out_features, self.rank), w)

    def get_delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def _adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * ((x @ self.lora_A.T) @ self.lora_B.T)


class _PerHeadLinear(AdapterLinear):
    """Per-head adapters: head ``h`` owns output rows ``h*dh:(h+1)*dh``; subclasses give the factors."""

    def __init__(self, base: nn.Linear, n_heads: int, rank: int, alpha: float | None, dropout: float) -> None:
        super().__init__(base, rank, alpha, dropout)
        self.n_heads = check_positive_int("n_heads", n_heads)
        if self.out_features % self.n_heads:
            raise ValueError(f"out_features={self.out_features} is not divisible by n_heads={self.n_heads}")
        self.head_dim = self.out_features // self.n_heads

    @abstractmethod
    def head_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head factors ``A (H, r, in)`` and ``B (H, out/H, r)`` (scaling not included)."""

    def get_delta_weight(self) -> torch.Tensor:
        return per_head_delta_weight(*self.head_factors(), self.scaling)

    def _adapter_output(self, x: torch.Tensor) -> torch.Tensor:
        return per_head_output(x, *self.head_factors(), self.scaling)

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, " + super().extra_repr()


class MultiHeadLoRALinear(_PerHeadLinear):
    """MH-LoRA: an independent rank-``r`` adapter on every head's block of output rows.

    Attributes
    ----------
    lora_A : nn.Parameter
        ``(H, r, in)``.
    lora_B : nn.Parameter
        ``(H, out/H, r)``, zero-initialised.
    """

    def __init__(self, base: nn.Linear, n_heads: int, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 *, generator: torch.Generator | None = None) -> None:
        super().__init__(base, n_heads, rank, alpha, dropout)
        w = self.base_layer.weight
        self.lora_A = _uniform((self.n_heads, self.rank, self.in_features), 1 / math.sqrt(self.in_features), w,
                               generator)
        self.lora_B = _zeros((self.n_heads, self.head_dim, self.rank), w)

    def head_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B

    @classmethod
    def from_factors(cls, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, alpha: float | None = None,
                     dropout: float = 0.0) -> MultiHeadLoRALinear:
        """An MH-LoRA layer holding copies of given factors ``A (H, r, in)``, ``B (H, out/H, r)``."""
        check_finite_tensor("A", A)
        check_finite_tensor("B", B)
        if A.dim() != 3 or B.dim() != 3 or A.shape[0] != B.shape[0] or A.shape[1] != B.shape[2]:
            raise ValueError(f"factors A {tuple(A.shape)} and B {tuple(B.shape)} must be (H, r, in) and (H, dh, r)")
        layer = cls(base, n_heads=A.shape[0], rank=A.shape[1], alpha=alpha, dropout=dropout)
        if layer.lora_A.shape != A.shape or layer.lora_B.shape != B.shape:
            raise ValueError(f"factors A {tuple(A.shape)}, B {tuple(B.shape)} do not fit the base layer: expected "
                             f"{tuple(layer.lora_A.shape)} and {tuple(layer.lora_B.shape)}")
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        return layer


class HoRALinear(_PerHeadLinear):
    """HoRA: per-head factors generated by a joint linear hypernetwork from head embeddings.

    ``A_h = A_0 + sum_k e_hk G^A_k`` and ``B_h = B_0 + sum_k e_hk G^B_k``: the shared
    low-rank adapter ``(A_0, B_0)`` is the hypernetwork's bias, the generator ``(G^A, G^B)``
    is shared by all heads, and the head embeddings ``e_h (m,)`` are the only head-specific
    parameters. Trainable count: ``(m + 1) r (in + out/H)`` plus ``H m`` for the embeddings
    (when owned by this layer).

    Parameters
    ----------
    base, n_heads, rank, alpha, dropout
        See :class:`AdapterLinear`; ``out_features`` must be divisible by ``n_heads``.
    hyper_dim : int
        Head-embedding dimension ``m``.
    head_embeddings : nn.Parameter, optional
        ``(H, m)`` embeddings shared with another layer (e.g. the Q and V adapters of one
        attention module); by default the layer owns ``N(0, 1)`` embeddings.
    generator : torch.Generator, optional
        Random source for the initialisation.

    Notes
    -----
    ``B_0`` and ``G^B`` start at zero (so ``B_h = 0``: the layer starts equal to the base);
    ``A_0`` starts ``U(-1/sqrt(in), 1/sqrt(in))`` and ``G^A`` the same divided by ``sqrt(m)``.
    """

    def __init__(self, base: nn.Linear, n_heads: int, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 *, hyper_dim: int = 1, head_embeddings: nn.Parameter | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(base, n_heads, rank, alpha, dropout)
        self.hyper_dim = m = check_positive_int("hyper_dim", hyper_dim)
        w = self.base_layer.weight
        if head_embeddings is None:
            emb = torch.randn((self.n_heads, m), generator=generator, dtype=w.dtype)
            head_embeddings = nn.Parameter(emb.to(w.device))
        elif not isinstance(head_embeddings, nn.Parameter) or tuple(head_embeddings.shape) != (self.n_heads, m):
            raise ValueError(f"head_embeddings must be an nn.Parameter of shape ({self.n_heads}, {m}), got "
                             f"{type(head_embeddings).__name__} {tuple(getattr(head_embeddings, 'shape', ()))}")
        else:
            check_finite_tensor("head_embeddings", head_embeddings)
        self.head_embeddings = head_embeddings
        bound = 1 / math.sqrt(self.in_features)
        self.shared_A = _uniform((self.rank, self.in_features), bound, w, generator)
        self.shared_B = _zeros((self.head_dim, self.rank), w)
        self.generator_A = _uniform((m, self.rank, self.in_features), bound / math.sqrt(m), w, generator)
        self.generator_B = _zeros((m, self.head_dim, self.rank), w)

    def head_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return generated_head_factors(self.head_embeddings, self.shared_A, self.generator_A, self.shared_B,
                                      self.generator_B)

    def extra_repr(self) -> str:
        return f"hyper_dim={self.hyper_dim}, " + super().extra_repr()
