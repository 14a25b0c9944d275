"""One-level (flat) mixture of experts: the sibling papers' regression models.

.. math::

    f_G(x) = \\sum_{i=1}^k \\mathrm{gate}_i(x)\\, \\phi(a_i^\\top x + b_i),

with ``gate = softmax_i(beta_1i^T x + beta_0i)`` (softmax gating) or
``gate_i = sigmoid(beta_1i^T x + beta_0i)`` (sigmoid gating, the gates do not sum to one),
and ``phi`` the identity, ReLU or tanh.

Known *anchor* experts (prefix form, [NoRGa eq. 21]) are extra atoms with fixed, known
parameters that enter the softmax denominator; they remove the softmax's translation
invariance in ``(beta_0, beta_1)``.
"""

from __future__ import annotations

import numpy as np
import torch

from hmoe_sim._validation import (
    check_choice,
    check_finite_tensor,
    check_nonnegative_int,
    check_positive_float,
    check_positive_int,
)
from hmoe_sim.models.base import MixingMeasure, MixtureModel, Params, dict_repr, softmax_mix

__all__ = ["AnalyticJacobian", "EXPERT_DERIVATIVES", "EXPERT_FUNCTIONS", "FlatMoE", "GATES", "Piece",
           "assemble_columns"]

EXPERT_FUNCTIONS = {
    "identity": lambda t: t,
    "relu": torch.relu,
    "tanh": torch.tanh,
}
#: derivative of each expert activation as a function of (pre-activation, activation);
#: ReLU gets slope 0 at 0, as torch's autograd does
EXPERT_DERIVATIVES = {
    "identity": lambda u, e: torch.ones_like(u),
    "relu": lambda u, e: (u > 0).to(u.dtype),
    "tanh": lambda u, e: 1 - e.square(),
}
GATES = ("softmax", "sigmoid")
_ANCHOR_NAMES = ("beta0", "beta1", "a", "b")


#: a block of Jacobian columns: ``(g, outer)`` with ``g`` ``(*batch, n, m)``; ``outer=False``
#: stands for the ``m`` columns ``g_j``, ``outer=True`` for the ``m * D`` columns ``g_j x_d``.
#: A model lists the same tensor object for the plain and the outer block of one derivative
#: (``beta_0`` and ``beta_1`` of an atom); the LM solver reads that as one Khatri-Rao factor.
Piece = tuple[torch.Tensor, bool]


class AnalyticJacobian:
    """Mixin for models with hand-derived Jacobian column blocks ``jacobian_pieces(params, X)``.

    ``jacobian_pieces`` returns ``f_G(X)`` and the list of :data:`Piece` s whose columns, in
    order, are the Jacobian in :meth:`flatten` order.
    """

    def value_and_jacobian(self, params: Params, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``f_G(X)`` ``(*batch, n)`` and its Jacobian ``(*batch, n, n_params)`` (no checks)."""
        f, pieces = self.jacobian_pieces(params, X)  # type: ignore[attr-defined]
        return f, assemble_columns(pieces, X)

    def jacobian(self, params: Params, X: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """Analytic Jacobian of ``f_G(X)`` with respect to the flattened parameters.

        Parameters
        ----------
        params : dict of torch.Tensor
            Parameter container, batch shape ``batch_p``.
        X : torch.Tensor
            ``(*batch_x, n, D)``; batch shapes combine as in ``predict``.
        check : bool, default True
            Validate shapes and finiteness.

        Returns
        -------
        torch.Tensor
            ``(*batch, n, n_params)``, columns in ``flatten`` order.
        """
        if check:
            self._check_inputs(params, X, check_finite=True)  # type: ignore[attr-defined]
        return self.value_and_jacobian(params, X)[1]  # type: ignore[attr-defined]


class FlatMoE(AnalyticJacobian, MixtureModel):
    """Flat mixture of experts with softmax or sigmoid gating.

    Parameters
    ----------
    input_dim : int
        Dimension ``D`` of ``x``.
    n_experts : int
        Number of free atoms ``k``.
    gate : {"softmax", "sigmoid"}
        Gating function.
    expert : {"identity", "relu", "tanh"}
        Expert activation ``phi``.
    anchors : dict of array-like, optional
        Known anchor atoms ``{"beta0": (m,), "beta1": (m, D), "a": (m, D), "b": (m,)}``.

    Notes
    -----
    Parameter container: ``beta0 (k,)``, ``beta1 (k, D)``, ``a (k, D)``, ``b (k,)``.
    Mixing-measure atoms are ``omega_i = (beta_1i, a_i, b_i)`` in ``R^{2D+1}``, weights
    ``exp(beta_0i)``.
    """

    def __init__(
        self,
        input_dim: int,
        n_experts: int,
        *,
        gate: str = "softmax",
        expert: str = "identity",
        anchors: dict[str, object] | None = None,
    ) -> None:
        self.input_dim = check_positive_int("input_dim", input_dim)
        self._n_experts = check_positive_int("n_experts", n_experts)
        self.gate = check_choice("gate", gate, GATES)
        self.expert = check_choice("expert", expert, EXPERT_FUNCTIONS)
        self._phi = EXPERT_FUNCTIONS[self.expert]
        self.anchors = None if anchors is None else self._check_anchors(anchors)
        self._anchor_cache: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    def _check_anchors(self, anchors: dict[str, object]) -> dict[str, torch.Tensor]:
        if set(anchors) != set(_ANCHOR_NAMES):
            raise ValueError(f"anchors must have exactly the keys {_ANCHOR_NAMES}, got {sorted(anchors)}")
        out = {k: torch.as_tensor(np.asarray(anchors[k], dtype=np.float64)) for k in _ANCHOR_NAMES}
        m = out["beta0"].shape[0] if out["beta0"].dim() == 1 else -1
        expected = {"beta0": (m,), "beta1": (m, self.input_dim), "a": (m, self.input_dim), "b": (m,)}
        for k, shape in expected.items():
            if m < 1 or tuple(out[k].shape) != shape:
                raise ValueError(f"anchors[{k!r}] has shape {tuple(out[k].shape)}; expected {shape}")
            check_finite_tensor(f"anchors[{k!r}]", out[k])
        return out

    def __repr__(self) -> str:
        n_anchor = 0 if self.anchors is None else self.anchors["beta0"].shape[0]
        return dict_repr(self, input_dim=self.input_dim, n_experts=self._n_experts, gate=self.gate,
                         expert=self.expert, n_anchors=n_anchor)

    # ------------------------------------------------------------------ structure
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        k, d = self._n_experts, self.input_dim
        return {"beta0": (k,), "beta1": (k, d), "a": (k, d), "b": (k,)}

    @property
    def n_atoms(self) -> int:
        return self._n_experts

    def with_atoms(self, n_atoms: int) -> FlatMoE:
        return FlatMoE(self.input_dim, n_atoms, gate=self.gate, expert=self.expert,
                       anchors=None if self.anchors is None else {k: v.numpy() for k, v in self.anchors.items()})

    def _anchors_on(self, like: torch.Tensor) -> dict[str, torch.Tensor]:
        assert self.anchors is not None
        key = (like.device, like.dtype)
        if key not in self._anchor_cache:
            self._anchor_cache[key] = {k: v.to(device=like.device, dtype=like.dtype)
                                       for k, v in self.anchors.items()}
        return self._anchor_cache[key]

    # ------------------------------------------------------------------ evaluation
    @staticmethod
    def _logits_and_preactivations(params: Params, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gating scores ``beta_1^T x + beta_0`` and expert pre-activations ``a^T x + b``, ``(*batch, n, k)``."""
        logits = torch.einsum("...nd,...kd->...nk", X, params["beta1"]) + params["beta0"].unsqueeze(-2)
        pre = torch.einsum("...nd,...kd->...nk", X, params["a"]) + params["b"].unsqueeze(-2)
        return logits, pre

    def _logits_and_experts(self, params: Params, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gating scores and expert outputs, each ``(*batch, n, k)``."""
        logits, pre = self._logits_and_preactivations(params, X)
        return logits, self._phi(pre)

    def gate_values(self, params: Params, X: torch.Tensor) -> torch.Tensor:
        """Gate weights of the free atoms, ``(*batch, n, k)`` (anchors excluded).

        With softmax gating and no anchors these sum to one over ``k``.
        """
        self._check_inputs(params, X, check_finite=True)
        logits, _ = self._logits_and_experts(params, X)
        if self.gate == "sigmoid":
            return torch.sigmoid(logits)
        all_logits = logits
        if self.anchors is not None:
            all_logits = torch.cat([self._anchor_logits(X), logits.expand(*_bshape(logits, X), -1)], -1)
        w = torch.softmax(all_logits, dim=-1)
        return w[..., w.shape[-1] - logits.shape[-1]:]

    def _anchor_logits(self, X: torch.Tensor) -> torch.Tensor:
        an = self._anchors_on(X)
        return X @ an["beta1"].T + an["beta0"]

    def _anchor_experts(self, X: torch.Tensor) -> torch.Tensor:
        an = self._anchors_on(X)
        return self._phi(X @ an["a"].T + an["b"])

    def _predict(self, params: Params, X: torch.Tensor) -> torch.Tensor:
        logits, experts = self._logits_and_experts(params, X)
        if self.gate == "sigmoid":
            out = (torch.sigmoid(logits) * experts).sum(-1)
            if self.anchors is not None:
                out = out + (torch.sigmoid(self._anchor_logits(X)) * self._anchor_experts(X)).sum(-1)
            return out
        if self.anchors is not None:
            shape = _bshape(logits, X)
            logits = torch.cat([self._anchor_logits(X).expand(*shape, -1), logits.expand(*shape, -1)], -1)
            experts = torch.cat([self._anchor_experts(X).expand(*shape, -1), experts.expand(*shape, -1)], -1)
        return softmax_mix(logits, experts)

    # ------------------------------------------------------------------ derivatives
    def _atom_major_scores(self, params: Params, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Gating scores and expert pre-activations of the anchors and the free atoms, atom-major:
        each ``(*batch, m + k, n)`` (the ``m`` anchors first), from one matrix product with ``X``.

        Atom-major keeps the sample axis innermost, so that the elementwise work of
        :meth:`jacobian_pieces` runs over long contiguous rows rather than rows of ``k + m``.
        """
        weights = [params["beta1"], params["a"]]
        biases = [params["beta0"], params["b"]]
        m = 0
        if self.anchors is not None:
            an = self._anchors_on(X)
            m = an["beta0"].shape[0]
            batch = params["beta0"].shape[:-1]
            weights = [torch.cat([an[na].expand(*batch, -1, -1), w], -2) for na, w in zip(("beta1", "a"), weights,
                                                                                             strict=True)]
            biases = [torch.cat([an[na].expand(*batch, -1), b], -1) for na, b in zip(("beta0", "b"), biases,
                                                                                       strict=True)]
        both = torch.matmul(torch.cat(weights, -2), X.transpose(-1, -2)) + torch.cat(biases, -1).unsqueeze(-1)
        logits, pre = both.chunk(2, dim=-2)
        return logits, pre, m

    def jacobian_pieces(self, params: Params, X: torch.Tensor) -> tuple[torch.Tensor, list[Piece]]:
        """``f_G(X)`` ``(*batch, n)`` and the Jacobian's column blocks (no checks).

        With logits ``l_k`` and pre-activations ``u_k = a_k^T x + b_k``: softmax gating gives
        ``df/dl_k = p_k (phi(u_k) - f)`` and ``df/du_k = p_k phi'(u_k)`` (``p`` the softmax over
        anchors and free atoms); sigmoid gating gives ``df/dl_k = sigma_k (1 - sigma_k) phi(u_k)``
        and ``df/du_k = sigma_k phi'(u_k)``. Then ``d/dbeta0 = df/dl``, ``d/dbeta1 = df/dl x``,
        ``d/da = df/du x``, ``d/db = df/du``. The blocks are computed atom-major
        (:meth:`_atom_major_scores`) and returned as transposed views, ``(*batch, n, k)``.
        """
        all_logits, all_pre, m = self._atom_major_scores(params, X)
        all_experts = self._phi(all_pre)
        pre, experts = all_pre[..., m:, :], all_experts[..., m:, :]
        if self.gate == "sigmoid":
            all_gates = torch.sigmoid(all_logits)
            f = (all_gates * all_experts).sum(-2)
            gate = all_gates[..., m:, :]
            d_logit = gate * (1 - gate) * experts
        else:
            weights = torch.exp(all_logits - torch.logsumexp(all_logits, dim=-2, keepdim=True))
            f = (weights * all_experts).sum(-2)
            gate = weights[..., m:, :]
            d_logit = gate * (experts - f.unsqueeze(-2))
        d_pre = gate if self.expert == "identity" else gate * EXPERT_DERIVATIVES[self.expert](pre, experts)
        d_logit, d_pre = d_logit.transpose(-1, -2), d_pre.transpose(-1, -2)
        return f, [(d_logit, False), (d_logit, True), (d_pre, True), (d_pre, False)]

    def mixing_measure(self, params: Params) -> MixingMeasure:
        self.batch_shape(params, check_finite=False)
        atoms = torch.cat([params["beta1"], params["a"], params["b"].unsqueeze(-1)], dim=-1)
        return MixingMeasure(weights=torch.exp(params["beta0"]), atoms=atoms, groups=None)

    # ------------------------------------------------------------------ truth
    def sample_truth(
        self,
        seed: int | None = None,
        *,
        gate_bias_std: float | None = None,
        gate_slope_std: float | None = None,
        expert_std: float | None = None,
        zero_gate_slopes: int = 0,
        min_separation: float = 0.0,
        max_tries: int = 10_000,
    ) -> Params:
        """Draw true parameters with the sibling papers' recipe [Sigmoid App. C].

        Defaults: ``beta_0 ~ N(0, 0.01/D)``, ``beta_1 ~ N(0, 0.01/D I)``,
        ``(a, b) ~ N(0, 1/D)``. The last ``zero_gate_slopes`` atoms get ``beta_1 = 0``
        (Regime 1 of the sigmoid paper is ``zero_gate_slopes = k``, Regime 2 is ``1``).
        With ``min_separation > 0`` draws are rejected until all pairwise atom distances
        are at least that large.

        Returns
        -------
        dict of torch.Tensor
            Unbatched float64 parameters on the CPU.
        """
        d, k = self.input_dim, self._n_experts
        gb = check_positive_float("gate_bias_std", 0.1 / np.sqrt(d) if gate_bias_std is None else gate_bias_std,
                                  allow_zero=True)
        gs = check_positive_float("gate_slope_std", 0.1 / np.sqrt(d) if gate_slope_std is None else gate_slope_std,
                                  allow_zero=True)
        es = check_positive_float("expert_std", 1.0 / np.sqrt(d) if expert_std is None else expert_std)
        zero = check_nonnegative_int("zero_gate_slopes", zero_gate_slopes)
        if zero > k:
            raise ValueError(f"zero_gate_slopes={zero} exceeds n_experts={k}")
        sep = check_positive_float("min_separation", min_separation, allow_zero=True)
        rng = np.random.default_rng(seed)
        for _ in range(check_positive_int("max_tries", max_tries)):
            beta1 = rng.normal(0.0, gs, size=(k, d))
            if zero:
                beta1[k - zero :] = 0.0
            truth = {
                "beta0": rng.normal(0.0, gb, size=k),
                "beta1": beta1,
                "a": rng.normal(0.0, es, size=(k, d)),
                "b": rng.normal(0.0, es, size=k),
            }
            atoms = np.concatenate([truth["beta1"], truth["a"], truth["b"][:, None]], axis=1)
            if min_pairwise_distance(atoms) >= sep:
                return {name: torch.as_tensor(v, dtype=torch.float64) for name, v in truth.items()}
        raise ValueError(f"no draw reached min_separation={sep} in {max_tries} tries; lower it")


def min_pairwise_distance(atoms: np.ndarray) -> float:
    """Smallest Euclidean distance between two rows of ``atoms`` (``inf`` for one row)."""
    if atoms.shape[0] < 2:
        return float("inf")
    diff = atoms[:, None, :] - atoms[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    return float(dist[np.triu_indices(atoms.shape[0], 1)].min())


def assemble_columns(pieces: list[Piece], X: torch.Tensor) -> torch.Tensor:
    """Concatenate Jacobian column blocks into one new ``(*lead, n, P)`` tensor.

    Each piece is ``(g, outer)`` with ``g`` of shape ``(*batch, n, m)``: ``outer=False``
    gives the ``m`` columns ``g_j``, ``outer=True`` the ``m * D`` columns ``g_j x_d``
    (``j`` major) with ``x`` the rows of ``X`` ``(*batch_x, n, D)``. Every block is written
    once into a preallocated tensor (no intermediate outer products, no concatenation copy),
    which is what the cost of a Jacobian of ``n * P`` numbers comes down to. The result is a
    transposed view of a ``(*lead, P, n)`` tensor (each column contiguous); ``J^T J`` and
    ``J^T r`` by matmul read it without a copy. Blocks that require grad are written by copies
    (autograd records them; the same numbers), so the Jacobian stays differentiable.
    """
    D = X.shape[-1]
    shapes = [g.shape[:-1] for g, _ in pieces] + [X.shape[:-1]]
    lead = torch.broadcast_shapes(*shapes)
    width = sum(g.shape[-1] * (D if outer else 1) for g, outer in pieces)
    ref = pieces[0][0]
    # stored parameter-major, (*batch, P, n), so that every block is a run of whole rows
    out = torch.empty(*lead[:-1], width, lead[-1], dtype=ref.dtype, device=ref.device)
    xt = X.transpose(-1, -2).contiguous().unsqueeze(-3)
    tracked = torch.is_grad_enabled() and (X.requires_grad or any(g.requires_grad for g, _ in pieces))
    start = 0
    for g, outer in pieces:
        m = g.shape[-1]
        gt = g.transpose(-1, -2).contiguous()
        if outer:
            block = out[..., start : start + m * D, :].unflatten(-2, (m, D))
            if tracked:  # out= arguments do not support autograd
                block.copy_(gt.unsqueeze(-2) * xt)
            else:
                torch.mul(gt.unsqueeze(-2), xt, out=block)
            start += m * D
        else:
            out[..., start : start + m, :].copy_(gt)
            start += m
    return out.transpose(-1, -2)


def _bshape(logits: torch.Tensor, X: torch.Tensor) -> tuple[int, ...]:
    """Broadcast shape ``(*batch, n)`` of parameter-side logits and ``X``."""
    return tuple(torch.broadcast_shapes(logits.shape[:-1], X.shape[:-1]))
