"""Two-level (hierarchical) mixture of experts read off a multi-head attention layer.

The adopted formulation (``paper_notes/02_formulation.md``; theory.md section 5 -- a
reconstruction, the HoRA paper text is not available): ``X = (x_1, ..., x_N)`` stacks
``N`` tokens of dimension ``d`` (``D = N d``). Head ``h`` is a softmax mixture of

* ``N`` *known* experts from a frozen attention head: gating score
  ``x_1^T W^Q_h (W^K_h)^T x_j / sqrt(d_k)`` and expert ``c_h^T (W^V_h)^T x_j``, and
* ``L`` *adapter* atoms: gating score ``beta_1hl^T X + beta_0hl`` and expert
  ``a_hl^T X + b_hl``,

and the heads are combined with first-level weights ``pi_h`` (uniform as in MHA, or a
softmax gate):

.. math::

    f_G(X) = \\sum_h \\pi_h(X) g_h(X),\\quad
    g_h(X) = \\frac{\\sum_j e^{s_{hj}(X)} v_{hj}(X) + \\sum_l e^{\\beta_{1hl}^\\top X + \\beta_{0hl}}
             (a_{hl}^\\top X + b_{hl})}{T_h(X)}.

``structure="nonshared"`` (MH-LoRA): every ``(beta_0, beta_1, a, b)`` is free.
``structure="shared"`` (HoRA): ``beta_1 = s(W_1 z)``, ``a = s(W_2 z)``, ``b = s(w_3^T z)``
with ``W_1, W_2 (D, q)``, ``w_3 (q,)`` shared by all heads and codes ``z_hl (q,)`` per
atom; only the masses ``beta_0`` stay free per atom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hmoe_sim._validation import (
    check_choice,
    check_finite_tensor,
    check_nonnegative_int,
    check_positive_float,
    check_positive_int,
)
from hmoe_sim.models._column_map import column_map_layout
from hmoe_sim.models.base import MixingMeasure, MixtureModel, Params, dict_repr
from hmoe_sim.models.flat import AnalyticJacobian, Piece, assemble_columns, min_pairwise_distance

__all__ = ["FrozenAttention", "HMoE", "STRUCTURES", "CODE_ACTIVATIONS", "CODE_DERIVATIVES", "FIRST_LEVEL_GATES"]

STRUCTURES = ("nonshared", "shared")
CODE_ACTIVATIONS = {"identity": lambda t: t, "tanh": torch.tanh}
#: derivative of each code activation as a function of (pre-activation, activation)
CODE_DERIVATIVES = {"identity": lambda u, s: torch.ones_like(u), "tanh": lambda u, s: 1 - s.square()}
FIRST_LEVEL_GATES = ("uniform", "softmax")


@dataclass(frozen=True)
class FrozenAttention:
    """Frozen weights of a multi-head attention layer with a scalar readout per head.

    Attributes
    ----------
    query, key : torch.Tensor
        ``(H, d, d_k)`` projections ``W^Q_h``, ``W^K_h`` (``q = x W^Q_h``).
    value : torch.Tensor
        ``(H, d, d_v)`` projections ``W^V_h``.
    readout : torch.Tensor
        ``(H, d_v)`` readout vectors ``c_h``; the head's scalar output is ``c_h^T o_h``.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    readout: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("query", "key", "value", "readout"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"FrozenAttention.{name} must be a floating torch.Tensor")
            check_finite_tensor(f"FrozenAttention.{name}", t)
        h, d, dk = self.query.shape if self.query.dim() == 3 else (-1, -1, -1)
        if h < 1 or tuple(self.key.shape) != (h, d, dk):
            raise ValueError(f"query {tuple(self.query.shape)} and key {tuple(self.key.shape)} "
                             "must both be (H, d, d_k)")
        if self.value.dim() != 3 or tuple(self.value.shape[:2]) != (h, d):
            raise ValueError(f"value has shape {tuple(self.value.shape)}; expected ({h}, {d}, d_v)")
        if tuple(self.readout.shape) != (h, self.value.shape[2]):
            raise ValueError(f"readout has shape {tuple(self.readout.shape)}; expected ({h}, {self.value.shape[2]})")

    @property
    def n_heads(self) -> int:
        return int(self.query.shape[0])

    @property
    def token_dim(self) -> int:
        return int(self.query.shape[1])

    @property
    def key_dim(self) -> int:
        return int(self.query.shape[2])

    @property
    def value_dim(self) -> int:
        return int(self.value.shape[2])

    @classmethod
    def from_seed(
        cls,
        seed: int,
        *,
        n_heads: int,
        token_dim: int,
        key_dim: int,
        value_dim: int,
        weight_std: float | None = None,
    ) -> FrozenAttention:
        """A random frozen layer: entries ``N(0, weight_std^2)`` (default ``1/sqrt(d)``),
        readouts ``N(0, 1/d_v)``. Stored in float64 on the CPU."""
        h = check_positive_int("n_heads", n_heads)
        d = check_positive_int("token_dim", token_dim)
        dk = check_positive_int("key_dim", key_dim)
        dv = check_positive_int("value_dim", value_dim)
        std = check_positive_float("weight_std", 1.0 / math.sqrt(d) if weight_std is None else weight_std)
        rng = np.random.default_rng(seed)
        t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
        return cls(
            query=t(rng.normal(0, std, (h, d, dk))),
            key=t(rng.normal(0, std, (h, d, dk))),
            value=t(rng.normal(0, std, (h, d, dv))),
            readout=t(rng.normal(0, 1 / math.sqrt(dv), (h, dv))),
        )


class HMoE(AnalyticJacobian, MixtureModel):
    """Hierarchical MoE: heads (first level) of known + adapter experts (second level).

    Parameters
    ----------
    attention : FrozenAttention
        The frozen layer providing each head's ``N`` known experts.
    n_tokens : int
        Number of tokens ``N``; inputs have ``D = N * attention.token_dim`` entries.
    n_adapters : int
        Adapter atoms ``L`` per head (0 removes them: the frozen layer itself).
    structure : {"nonshared", "shared"}
        Free atoms (MH-LoRA) or atoms generated by a joint hypernetwork (HoRA).
    code_dim : int, optional
        Code dimension ``q`` of the shared structure (default ``min(D, 2)``).
    code_activation : {"identity", "tanh"}
        The map ``s`` of the shared structure.
    first_level : {"uniform", "softmax"}
        Uniform head weights ``1/H`` or a softmax gate ``pi_h(X) = softmax_h(gamma_0h +
        gamma_1h^T X)`` with head 0 as reference (``gamma_00 = 0, gamma_10 = 0``).

    Notes
    -----
    Parameter container, non-shared: ``beta0 (H, L)``, ``beta1 (H, L, D)``, ``a (H, L, D)``,
    ``b (H, L)``; shared: ``beta0 (H, L)``, ``W1 (D, q)``, ``W2 (D, q)``, ``w3 (q,)``,
    ``z (H, L, q)``; with a softmax first level also ``head_gate_bias (H-1,)`` and
    ``head_gate_slope (H-1, D)``.
    """

    def __init__(
        self,
        attention: FrozenAttention,
        *,
        n_tokens: int,
        n_adapters: int,
        structure: str = "nonshared",
        code_dim: int | None = None,
        code_activation: str = "identity",
        first_level: str = "uniform",
    ) -> None:
        if not isinstance(attention, FrozenAttention):
            raise TypeError(f"attention must be a FrozenAttention, got {type(attention).__name__}")
        self.attention = attention
        self.n_tokens = check_positive_int("n_tokens", n_tokens)
        self.input_dim = self.n_tokens * attention.token_dim
        self.n_heads = attention.n_heads
        self.n_adapters = check_nonnegative_int("n_adapters", n_adapters)
        self.structure = check_choice("structure", structure, STRUCTURES)
        self.code_dim = check_positive_int("code_dim", min(self.input_dim, 2) if code_dim is None else code_dim)
        self.code_activation = check_choice("code_activation", code_activation, CODE_ACTIVATIONS)
        self._s = CODE_ACTIVATIONS[self.code_activation]
        self.first_level = check_choice("first_level", first_level, FIRST_LEVEL_GATES)
        self._frozen_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def __repr__(self) -> str:
        return dict_repr(self, n_heads=self.n_heads, n_tokens=self.n_tokens,
                         token_dim=self.attention.token_dim, n_adapters=self.n_adapters,
                         structure=self.structure, code_dim=self.code_dim,
                         code_activation=self.code_activation, first_level=self.first_level)

    def _replace(self, **changes: object) -> HMoE:
        kwargs: dict[str, object] = dict(
            n_tokens=self.n_tokens, n_adapters=self.n_adapters, structure=self.structure,
            code_dim=self.code_dim, code_activation=self.code_activation, first_level=self.first_level)
        kwargs.update(changes)
        return HMoE(self.attention, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ structure
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        h, ell, d, q = self.n_heads, self.n_adapters, self.input_dim, self.code_dim
        shapes: dict[str, tuple[int, ...]] = {"beta0": (h, ell)}
        if self.structure == "nonshared":
            shapes.update({"beta1": (h, ell, d), "a": (h, ell, d), "b": (h, ell)})
        else:
            shapes.update({"W1": (d, q), "W2": (d, q), "w3": (q,), "z": (h, ell, q)})
        if self.first_level == "softmax":
            shapes.update({"head_gate_bias": (h - 1,), "head_gate_slope": (h - 1, d)})
        return shapes

    @property
    def n_atoms(self) -> int:
        """Total adapter atoms ``H * L``."""
        return self.n_heads * self.n_adapters

    def with_atoms(self, n_atoms: int) -> HMoE:
        """Same model with ``n_atoms`` adapter atoms *per head*."""
        return self._replace(n_adapters=n_atoms)

    def with_structure(self, structure: str) -> HMoE:
        """Same model with the other structure."""
        return self._replace(structure=structure)

    @property
    def atom_groups(self) -> torch.Tensor:
        """``(H*L,)`` head index of each adapter atom (head-major order)."""
        return torch.arange(self.n_heads).repeat_interleave(self.n_adapters)

    # ------------------------------------------------------------------ shared -> free atoms
    def to_nonshared(self, params: Params) -> Params:
        """Atoms generated by the hypernetwork, as a non-shared parameter container.

        For a non-shared model this returns ``params`` unchanged.
        """
        if self.structure == "nonshared":
            return params
        h, ell, d = self.n_heads, self.n_adapters, self.input_dim
        generated = self._s(self._pre_activations(params)[0])                # (*batch, H*L, 2D + 1)
        out = {
            "beta0": params["beta0"],
            "beta1": generated[..., :d].unflatten(-2, (h, ell)),
            "a": generated[..., d : 2 * d].unflatten(-2, (h, ell)),
            "b": generated[..., 2 * d].unflatten(-1, (h, ell)),
        }
        for name in ("head_gate_bias", "head_gate_slope"):
            if name in params:
                out[name] = params[name]
        return out

    def _pre_activations(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``(*batch, H*L, 2D + 1)``: per atom the pre-activations ``W_1 z``, ``W_2 z``, ``w_3^T z`` of the
        generated ``beta_1``, ``a`` and ``b``, from one matrix product of the codes with the stacked
        hypernetwork ``(W_1; W_2; w_3^T)``, which is returned too (``(*batch, 2D + 1, q)``)."""
        hyper = torch.cat([params["W1"], params["W2"], params["w3"].unsqueeze(-2)], -2)
        return torch.matmul(params["z"].flatten(-3, -2), hyper.mT), hyper

    # ------------------------------------------------------------------ evaluation
    def _frozen_on(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (like.device, like.dtype)
        if key not in self._frozen_cache:
            att = self.attention
            cast = lambda t: t.to(device=like.device, dtype=like.dtype)  # noqa: E731
            value_readout = torch.einsum("hdv,hv->hd", att.value, att.readout)
            self._frozen_cache[key] = (cast(att.query), cast(att.key), cast(value_readout))
        return self._frozen_cache[key]

    def known_scores_and_experts(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Known experts' gating scores and outputs, each ``(*batch_x, n, H, N)``."""
        wq, wk, vc = self._frozen_on(X)
        tokens = X.reshape(*X.shape[:-1], self.n_tokens, self.attention.token_dim)
        q1 = torch.einsum("...d,hdk->...hk", tokens[..., 0, :], wq)
        keys = torch.einsum("...td,hdk->...htk", tokens, wk)
        scores = torch.einsum("...hk,...htk->...ht", q1, keys) / math.sqrt(self.attention.key_dim)
        experts = torch.einsum("...td,hd->...ht", tokens, vc)
        return scores, experts

    def frozen_atoms(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's known experts as one atom per sample: logit ``F_h = logsumexp_j s_hj`` and
        value ``V_h = sum_j softmax_j(s_h) v_hj``, each ``(*batch_x, H, n)`` (head-major).

        Exact: ``e^{F_h} V_h = sum_j e^{s_hj} v_hj`` and ``e^{F_h} = sum_j e^{s_hj}``. They do not
        depend on the parameters, so a fit forms them once per data set
        (:meth:`prepare_inputs`).
        """
        scores, experts = self.known_scores_and_experts(X)
        logit = torch.logsumexp(scores, -1)
        value = (torch.softmax(scores, -1) * experts).sum(-1)
        return logit.transpose(-1, -2).contiguous(), value.transpose(-1, -2).contiguous()

    def prepare_inputs(self, X: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the model computes from the inputs alone: the :meth:`frozen_atoms` and the extended
        inputs ``(1, x)`` sample-innermost, ``(*batch_x, D + 1, n)``. The estimators form them
        once per stack of data sets and pass them back as ``prepared``."""
        ext = torch.cat([torch.ones_like(X[..., :1]), X], -1).transpose(-1, -2).contiguous()
        return (*self.frozen_atoms(X), ext)

    def _head_major(self, free: Params, X: torch.Tensor, prepared: tuple[torch.Tensor, ...] | None,
                    in_place: bool = False) -> tuple[torch.Tensor, ...]:
        """Head-major evaluation (the sample axis innermost): within-head weights ``p`` of the adapters and
        their values (each ``(*batch, H, L, n)``), head outputs ``g`` ``(*batch, H, n)``, head weights ``pi``
        (``(*batch, H, n)``, or ``1/H`` for a uniform first level) and the product ``(*batch, R, n)`` of the
        rows (adapter logits, values, head logits) with ``(1, x)`` (logits and values are views of it).
        ``in_place`` (no autograd of any kind): the same operations on the same numbers, in place."""
        h, ell = self.n_heads, self.n_adapters
        known_logit, known_value, ext = self.prepare_inputs(X) if prepared is None else prepared
        # rows (bias, slope) of the adapter logits, the adapter values and the head logits, times (1, x)
        rows = [torch.cat([free["beta0"].unsqueeze(-1), free["beta1"]], -1).flatten(-3, -2),
                torch.cat([free["b"].unsqueeze(-1), free["a"]], -1).flatten(-3, -2)]
        if self.first_level == "softmax":
            rows.append(torch.cat([free["head_gate_bias"].unsqueeze(-1), free["head_gate_slope"]], -1))
        both = torch.matmul(torch.cat(rows, -2), ext)  # the rows share the parameters' batch shape
        logits = both[..., : h * ell, :].unflatten(-2, (h, ell))
        values = both[..., h * ell : 2 * h * ell, :].unflatten(-2, (h, ell))
        # within-head softmax over the frozen atom and the adapters, shifted by their maximum
        # (every exponential at most 1, the normaliser at least 1)
        known_logit = known_logit.unsqueeze(-2)
        if in_place and ell and not both.requires_grad:  # each temporary has ``both``'s batch shape
            top = logits.amax(-2, keepdim=True)
            p = (logits - torch.maximum(top, known_logit, out=top)).exp_()
            known_p = (known_logit - top).exp_()
            total = p.sum(-2, keepdim=True).add_(known_p)
            p.div_(total)
            g = known_p.div_(total).mul_(known_value.unsqueeze(-2)).squeeze(-2).add_((p * values).sum(-2))
        else:
            top = torch.maximum(logits.amax(-2, keepdim=True), known_logit) if ell else known_logit
            p = torch.exp(logits - top)
            known_p = torch.exp(known_logit - top)
            total = p.sum(-2, keepdim=True) + known_p
            p, known_p = p / total, known_p / total
            g = (known_p * known_value.unsqueeze(-2)).squeeze(-2) + (p * values).sum(-2)
        if self.first_level == "uniform":
            return p, values, g, 1.0 / h, both
        head_logits = both[..., 2 * h * ell :, :]
        pi = torch.softmax(torch.cat([torch.zeros_like(head_logits[..., :1, :]), head_logits], -2), -2)
        return p, values, g, pi, both

    def _head_outputs(self, free: Params, X: torch.Tensor,
                      prepared: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """``g_h(X)`` for every head, ``(*batch, n, H)``; ``free`` is a non-shared container,
        ``prepared`` the :meth:`prepare_inputs` of ``X`` (formed here when not given)."""
        return self._head_major(free, X, prepared)[2].transpose(-1, -2)

    def head_weights(self, free: Params, X: torch.Tensor) -> torch.Tensor:
        """First-level weights ``pi_h(X)``, ``(*batch, n, H)``."""
        if self.first_level == "uniform":
            return torch.full((*X.shape[:-1], self.n_heads), 1.0 / self.n_heads, dtype=X.dtype, device=X.device)
        logits = (torch.einsum("...nd,...hd->...nh", X, free["head_gate_slope"])
                  + free["head_gate_bias"].unsqueeze(-2))
        logits = torch.cat([torch.zeros_like(logits[..., :1]), logits], dim=-1)
        return torch.softmax(logits, dim=-1)

    def _predict(self, params: Params, X: torch.Tensor) -> torch.Tensor:
        return self.predict_prepared(params, X, None)

    def predict_prepared(self, params: Params, X: torch.Tensor,
                         prepared: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
        """``f_G(X)`` (no checks) with the :meth:`prepare_inputs` of ``X`` (``None``: formed here)."""
        _, _, g, pi, _ = self._head_major(self.to_nonshared(params), X, prepared)
        return (pi * g).sum(-2)

    # ------------------------------------------------------------------ derivatives
    def jacobian_factors(self, params: Params, X: torch.Tensor, prepared: tuple[torch.Tensor, ...] | None = None,
                         *, with_column_map: bool = True, in_place: bool = False
                         ) -> tuple[torch.Tensor, list[Piece], torch.Tensor | None]:
        """``f_G(X)`` ``(*batch, n)``, the column blocks of the *non-shared* Jacobian at
        :meth:`to_nonshared` ``(params)`` and the column map ``M`` (:meth:`column_map`; ``None``
        for a non-shared model, or when ``with_column_map`` is false: the estimators form it only
        for the steps they accept), so that the Jacobian is ``J_ns M`` (no checks).

        With ``p_hl`` the within-head softmax weight of adapter ``(h, l)``, its logit
        ``l_hl`` and value ``v_hl``: ``df/dl_hl = pi_h p_hl (v_hl - g_h)`` and
        ``df/dv_hl = pi_h p_hl``; a softmax first level adds ``df/d(head logit h) =
        pi_h (g_h - f)``. ``prepared`` is the :meth:`prepare_inputs` of ``X`` (formed here when
        not given). ``in_place``: for callers without autograd of any kind (the estimators), fewer
        new arrays (the same numbers).
        """
        h, ell = self.n_heads, self.n_adapters
        p, values, g, pi, both = self._head_major(self.to_nonshared(params), X, prepared, in_place)
        f = (pi * g).sum(-2)
        pi_ = pi.unsqueeze(-2) if isinstance(pi, torch.Tensor) else pi
        # the blocks side by side in one buffer, logit block first (then value, then head), read without
        # copying by KhatriRaoLayout.factors; in place, it is ``both`` (its logit rows are no longer needed)
        reuse = in_place and not both.requires_grad
        if reuse:  # values - g into the logit rows, then d_value over the values, d_logit over values - g
            d_logit, d_value = both[..., : 2 * h * ell, :].unflatten(-2, (2, h, ell)).unbind(-4)  # (*batch, H, L, n)
            spread = torch.sub(values, g.unsqueeze(-2), out=d_logit)
            torch.mul(pi_, p, out=d_value)
            torch.mul(d_value, spread, out=d_logit)
        else:  # differentiable (no out= arguments): the same numbers, stacked into one buffer
            d_value = pi_ * p
            d_logit, d_value = torch.stack([d_value * (values - g.unsqueeze(-2)), d_value], -4).unbind(-4)
        # transposed views (*batch, n, H*L) of head-major blocks
        d_logit, d_value = d_logit.flatten(-3, -2).transpose(-1, -2), d_value.flatten(-3, -2).transpose(-1, -2)
        pieces: list[Piece] = [(d_logit, False), (d_logit, True), (d_value, True), (d_value, False)]
        if self.first_level == "softmax":
            above = g - f.unsqueeze(-2)
            # in place: into the head-logit rows, right after the value block
            d_head = (torch.mul(pi[..., 1:, :], above[..., 1:, :], out=both[..., 2 * h * ell :, :]) if reuse
                      else (pi * above)[..., 1:, :]).transpose(-1, -2)
            pieces += [(d_head, False), (d_head, True)]
        return f, pieces, self.column_map(params) if self.maps_columns and with_column_map else None

    def value_and_jacobian(self, params: Params, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``f_G(X)`` ``(*batch, n)`` and its Jacobian ``(*batch, n, n_params)`` (no checks)."""
        f, pieces, column_map = self.jacobian_factors(params, X)
        J = assemble_columns(pieces, X)
        return f, J if column_map is None else J @ column_map

    @property
    def maps_columns(self) -> bool:
        """Whether the Jacobian is ``J_ns M`` with a :meth:`column_map` ``M`` (the shared structure)."""
        return self.structure == "shared"

    def column_map(self, params: Params) -> torch.Tensor:
        """``M = d theta_ns / d theta``, ``(*batch, P_ns, P)``: the derivative of the flattened
        :meth:`to_nonshared` container with respect to the flattened shared parameters.

        The shared parameters enter ``f`` only through the generated atoms, so the shared
        Jacobian is ``J_ns M`` and the normal equations are ``M^T (J_ns^T J_ns) M`` and
        ``M^T J_ns^T r``. With ``t = s'`` at the pre-activations ``u1 = W_1 z``, ``u2 = W_2 z``,
        ``u3 = w_3^T z``: ``d beta_1hld / d W_1dq = t1_hld z_hlq``, ``d beta_1hld / d z_hlq =
        t1_hld W_1dq`` (``a`` alike with ``W_2``), ``d b_hl / d w_3q = t3_hl z_hlq``,
        ``d b_hl / d z_hlq = t3_hl w_3q``; ``beta_0`` and the head gate map to themselves.
        """
        if self.structure != "shared":
            raise ValueError(f"column_map is defined for the shared structure; this model is {self.structure!r}")
        z = params["z"]
        batch, hl, q = z.shape[:-3], self.n_atoms, self.code_dim
        u, hyper = self._pre_activations(params)                   # (*batch, H*L, 2D + 1), (*batch, 2D + 1, q)
        slope = CODE_DERIVATIVES[self.code_activation](u, self._s(u)).unsqueeze(-1)   # s'(u), (..., H*L, 2D + 1, 1)
        by_code = slope * hyper.unsqueeze(-3)                      # d gen_kr / d z_kq = s'(u_kr) W_rq
        by_hyper = slope * z.reshape(*batch, hl, 1, q)             # d gen_kr / d W_rq = s'(u_kr) z_kq
        n_gate = (self.n_heads - 1) * (self.input_dim + 1) if self.first_level == "softmax" else 0
        (p_ns, p_s), (at_code, at_hyper, at_one) = column_map_layout(hl, self.input_dim, q, n_gate, z.device)
        M = torch.zeros(*batch, p_ns * p_s, dtype=z.dtype, device=z.device)
        M[..., at_code] = by_code.flatten(-3)
        M[..., at_hyper] = by_hyper.flatten(-3)
        M[..., at_one] = 1.0
        return M.unflatten(-1, (p_ns, p_s))

    def mixing_measure(self, params: Params) -> MixingMeasure:
        batch = self.batch_shape(params, check_finite=False)
        free = self.to_nonshared(params)
        h, ell, d = self.n_heads, self.n_adapters, self.input_dim
        atoms = torch.cat([free["beta1"], free["a"], free["b"].unsqueeze(-1)], dim=-1)
        return MixingMeasure(
            weights=torch.exp(free["beta0"]).reshape(*batch, h * ell),
            atoms=atoms.reshape(*batch, h * ell, 2 * d + 1),
            groups=self.atom_groups,
        )

    # ------------------------------------------------------------------ truth
    def sample_truth(
        self,
        seed: int | None = None,
        *,
        gate_bias_std: float | None = None,
        gate_slope_std: float | None = None,
        expert_std: float | None = None,
        head_gate_std: float = 0.5,
        min_separation: float = 0.0,
        max_tries: int = 10_000,
    ) -> Params:
        """Draw true adapter parameters (unbatched, float64, CPU).

        Non-shared: ``beta_0 ~ N(0, gate_bias_std^2)`` (default ``0.1/sqrt(D)``),
        ``beta_1 ~ N(0, gate_slope_std^2 I)`` (default ``1/sqrt(D)``),
        ``(a, b) ~ N(0, expert_std^2)`` (default ``1/sqrt(D)``).
        Shared: ``z ~ N(0, I_q)``, ``W_1 ~ N(0, gate_slope_std^2/q)``,
        ``W_2, w_3 ~ N(0, expert_std^2/q)`` so that the generated atoms have the same
        scales before ``s``. ``min_separation`` is enforced between atoms of the same head.
        """
        h, ell, d, q = self.n_heads, self.n_adapters, self.input_dim, self.code_dim
        gb = check_positive_float("gate_bias_std", 0.1 / math.sqrt(d) if gate_bias_std is None else gate_bias_std,
                                  allow_zero=True)
        gs = check_positive_float("gate_slope_std", 1 / math.sqrt(d) if gate_slope_std is None else gate_slope_std,
                                  allow_zero=True)
        es = check_positive_float("expert_std", 1 / math.sqrt(d) if expert_std is None else expert_std)
        hg = check_positive_float("head_gate_std", head_gate_std, allow_zero=True)
        sep = check_positive_float("min_separation", min_separation, allow_zero=True)
        rng = np.random.default_rng(seed)
        for _ in range(check_positive_int("max_tries", max_tries)):
            raw: dict[str, np.ndarray] = {"beta0": rng.normal(0, gb, (h, ell))}
            if self.structure == "nonshared":
                raw.update(beta1=rng.normal(0, gs, (h, ell, d)), a=rng.normal(0, es, (h, ell, d)),
                           b=rng.normal(0, es, (h, ell)))
            else:
                raw.update(W1=rng.normal(0, gs / math.sqrt(q), (d, q)), W2=rng.normal(0, es / math.sqrt(q), (d, q)),
                           w3=rng.normal(0, es / math.sqrt(q), (q,)), z=rng.normal(0, 1, (h, ell, q)))
            if self.first_level == "softmax":
                raw.update(head_gate_bias=rng.normal(0, hg, (h - 1,)),
                           head_gate_slope=rng.normal(0, hg / math.sqrt(d), (h - 1, d)))
            truth = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in raw.items()}
            atoms = self.mixing_measure(truth).atoms.numpy().reshape(h, ell, 2 * d + 1)
            if all(min_pairwise_distance(atoms[i]) >= sep for i in range(h)):
                return truth
        raise ValueError(f"no draw reached min_separation={sep} in {max_tries} tries; lower it")
