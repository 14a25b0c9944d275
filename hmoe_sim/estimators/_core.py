"""Shared pieces of the batched solvers (private).

A *problem* is one data set ``(X_b, y_b, mask_b)`` with its own flattened parameter
vector ``theta_b`` of length ``P``. All functions here act on a stack of problems and never
mix them: every reduction runs over the sample axis or the parameter axis of one problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hmoe_sim.estimators._gram import factor_gram, pair_products, sample_blocked, side_by_side
from hmoe_sim.models.base import MixtureModel
from hmoe_sim.models.flat import Piece, assemble_columns

__all__ = ["CONVERGED_REASONS", "STOP_REASONS", "KhatriRaoLayout", "Linearization", "Problem", "SolverOutput",
           "autograd_value_and_jacobian", "gradient_small", "khatri_rao_layout", "normal_equations",
           "projected_gradient", "risk_and_gradient", "rows_where", "stop_code", "take_rows"]


@dataclass
class Problem:
    """A stack of ``B`` least-squares problems on one device and dtype.

    Attributes
    ----------
    model : MixtureModel
    X : torch.Tensor
        ``(B, n, D)``; rows outside the mask are zero.
    y : torch.Tensor
        ``(B, n)``; entries outside the mask are zero.
    weight : torch.Tensor
        ``(B, n)`` 1.0 where a sample belongs to the data set, 0.0 elsewhere.
    n_eff : torch.Tensor
        ``(B,)`` number of samples of each data set.
    lo, hi : torch.Tensor
        ``(P,)`` box bounds of the flattened parameters.
    structured : bool
        Form ``J^T J`` from the Khatri-Rao factors of the Jacobian where a model's column
        blocks have that structure and it is cheaper (:func:`khatri_rao_layout`); ``False``
        always assembles ``J``. Both give the same matrices up to rounding.
    unmasked : bool, optional
        Every weight is one (computed when not given); then the Jacobian needs no masking.

    Notes
    -----
    What depends on the data alone is formed once per stack and carried into sub-stacks by
    :meth:`take`: the input products (:meth:`input_products`) and a model's prepared inputs
    (:meth:`prepared`). Both live on the problem, never on the model, so a new data set
    (a new ``Problem``) can never reuse those of another.
    """

    model: MixtureModel
    X: torch.Tensor
    y: torch.Tensor
    weight: torch.Tensor
    n_eff: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    structured: bool = True
    unmasked: bool | None = None
    _input_products: torch.Tensor | None = field(default=None, repr=False)
    _prepared: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.unmasked is None:
            self.unmasked = bool((self.weight == 1).all())

    def take(self, index: torch.Tensor | None) -> Problem:
        """The sub-stack ``index`` (``None``: all problems, no copy)."""
        if index is None:
            return self
        products = None if self._input_products is None else self._input_products[index]
        prepared = None if self._prepared is None else tuple(t[index] for t in self._prepared)
        return Problem(self.model, self.X[index], self.y[index], self.weight[index], self.n_eff[index],
                       self.lo, self.hi, self.structured, self.unmasked, products, prepared)

    def prepared(self) -> tuple[torch.Tensor, ...] | None:
        """The model's ``prepare_inputs(X)`` (tensors with the stack's leading axis), formed once
        per stack; ``None`` for a model without it. :class:`~hmoe_sim.models.hmoe.HMoE`
        prepares the frozen heads' atoms and the extended inputs ``(1, x)``, which do not depend on
        the parameters."""
        if self._prepared is None:
            prepare = getattr(self.model, "prepare_inputs", None)
            if prepare is None:
                return None
            self._prepared = tuple(prepare(self.X))
        return self._prepared

    def input_products(self) -> torch.Tensor:
        """``(B, (D+1)(D+2)/2, n)``: the products ``x~_p x~_q`` (``p <= q``, row-major) of the
        extended inputs ``x~ = (1, x)``; the first ``D + 1`` rows are ``x~`` itself.

        They do not change during a fit, so they are formed once per stack (and carried
        into sub-stacks by :meth:`take`).
        """
        if self._input_products is None:
            ext = torch.cat([torch.ones_like(self.X[..., :1]), self.X], -1).transpose(-1, -2).contiguous()
            self._input_products = pair_products(ext)
        return self._input_products

    def predict(self, theta: torch.Tensor) -> torch.Tensor:
        """``f_theta(X)``, ``(b, n)`` for ``theta (b, P)`` (with the :meth:`prepared` inputs where
        the model has them)."""
        prepared = self.prepared()
        if prepared is not None:
            return self.model.predict_prepared(self.model.unflatten(theta), self.X, prepared)  # type: ignore[attr-defined]
        return self.model.predict(self.model.unflatten(theta), self.X, check=False)

    def residual(self, theta: torch.Tensor) -> torch.Tensor:
        """Masked residuals ``w * (y - f_theta(X))``, ``(b, n)``."""
        return self.weight * (self.y - self.predict(theta))

    def residual_and_jacobian(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked residuals ``(b, n)`` and the masked Jacobian of ``f`` ``(b, n, P)``.

        Uses the model's analytic ``value_and_jacobian`` when it has one (every model of
        :mod:`hmoe_sim.models`), otherwise :func:`autograd_value_and_jacobian`.
        """
        analytic = getattr(self.model, "value_and_jacobian", None)
        if analytic is not None:
            f, jac = analytic(self.model.unflatten(theta), self.X)
        else:
            f, jac = autograd_value_and_jacobian(self.model, theta, self.X)
        if not self.unmasked:
            jac = jac * self.weight.unsqueeze(-1)
        return self.weight * (self.y - f), jac

    def _masked(self, residual: torch.Tensor) -> torch.Tensor:
        """``w * residual`` (the residual itself when every weight is one: the same numbers)."""
        return residual if self.unmasked else self.weight * residual

    def linearize(self, theta: torch.Tensor) -> Linearization:
        """The masked residual at ``theta`` and the Jacobian in the cheapest form to hand.

        With a model's ``jacobian_pieces`` this is one evaluation of ``f`` and of the
        per-atom derivative blocks (``O(n k)`` numbers, not the ``n x P`` Jacobian); the
        normal equations are formed only on request (:meth:`Linearization.normal_equations`),
        so a step that is rejected costs one such evaluation and nothing more. A model with
        ``jacobian_factors`` (:class:`~hmoe_sim.models.hmoe.HMoE`) gives the blocks of another
        parametrisation's Jacobian; the map ``M`` of its columns (``J = J_blocks M``, the model's
        ``column_map``) is formed with the normal equations, for the rows asked for.
        """
        factors_of = getattr(self.model, "jacobian_factors", None)
        if factors_of is not None:
            params = self.model.unflatten(theta)
            f, pieces, _ = factors_of(params, self.X, self.prepared(), with_column_map=False, in_place=True)
            return Linearization(self, theta, self._masked(self.y - f), pieces,
                                 mapped=bool(getattr(self.model, "maps_columns", False)), params=params)
        pieces_of = getattr(self.model, "jacobian_pieces", None)
        if pieces_of is not None:
            f, pieces = pieces_of(self.model.unflatten(theta), self.X)
            return Linearization(self, theta, self._masked(self.y - f), pieces)
        return Linearization(self, theta, self.residual(theta), None)


@dataclass
class Linearization:
    """A stack of problems linearised at ``theta``.

    Attributes
    ----------
    problem : Problem
    theta : torch.Tensor
        ``(b, P)``.
    r : torch.Tensor
        ``(b, n)`` masked residuals ``w (y - f_theta(X))``.
    pieces : list of Piece, or None
        The Jacobian's column blocks (``jacobian_pieces``), ``None`` for a model without them.
    mapped : bool
        The pieces are the blocks ``J_blocks`` of another parametrisation's Jacobian and the Jacobian
        is ``J_blocks M`` with ``M`` the model's ``column_map`` at ``theta`` (``jacobian_factors``);
        ``False``: the pieces are the Jacobian itself.
    params : dict, optional
        ``model.unflatten(theta)``, when the linearisation had it (the column map reads it).
    """

    problem: Problem
    theta: torch.Tensor
    r: torch.Tensor
    pieces: list[Piece] | None
    mapped: bool = False
    params: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def column_map(self) -> torch.Tensor | None:
        """``(b, P_blocks, P)``: the map ``M`` of a mapped linearisation (``None`` otherwise)."""
        return self._column_map(None) if self.mapped else None

    def _column_map(self, rows: torch.Tensor | None) -> torch.Tensor:
        model = self.problem.model
        if rows is None and self.params is not None:
            params = self.params
        else:
            params = model.unflatten(take_rows(rows, self.theta))
        return model.column_map(params)  # type: ignore[attr-defined]

    def normal_equations(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``A = J^T J`` ``(b', P, P)`` and ``g = J^T r`` ``(b', P)`` of the problems ``rows``.

        ``rows`` indexes this stack (``None``: all). With a Khatri-Rao layout
        (:func:`khatri_rao_layout`), ``A`` is gathered from the products of the factor
        pairs with the input pairs; otherwise ``J`` is assembled and multiplied out. ``g``
        is formed as ``r^T J`` by ``bmm``: unlike ``J^T r`` (which torch may route to a
        matrix-vector kernel for one problem and a batched one for several), this gives every
        problem bit-identical results whatever the size of the stack it is solved in.

        With a column map ``M`` (formed here, for ``rows`` only) the equations of the blocks'
        columns are formed as above and mapped: ``A = M^T A_blocks M``, ``g = M^T g_blocks``
        (``J^T J = M^T J_b^T J_b M``).
        """
        A, g = self._block_normal_equations(rows)
        if not self.mapped:
            return A, g
        M = self._column_map(rows)
        return M.mT @ A @ M, torch.bmm(g.unsqueeze(-2), M).squeeze(-2)

    def _block_normal_equations(self, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`normal_equations` of the columns of ``pieces`` (before any column map)."""
        problem, r = self.problem, self.r
        if self.pieces is None:
            sub = problem.take(rows)
            _, J = sub.residual_and_jacobian(take_rows(rows, self.theta))
            r = take_rows(rows, r)
            return J.transpose(-1, -2) @ J, torch.bmm(r.unsqueeze(-2), J).squeeze(-2)
        layout = khatri_rao_layout(self.pieces, problem.X.shape[-1]) if problem.structured else None
        if layout is None:
            pieces = [(take_rows(rows, g), outer) for g, outer in self.pieces]
            J = assemble_columns(pieces, take_rows(rows, problem.X))
            if not problem.unmasked:
                J = J * take_rows(rows, problem.weight).unsqueeze(-1)
            r = take_rows(rows, r)
            return J.transpose(-1, -2) @ J, torch.bmm(r.unsqueeze(-2), J).squeeze(-2)
        factors = layout.factors(self.pieces)                        # (b, m, n)
        if not problem.unmasked:
            factors = factors * problem.weight.unsqueeze(-2)
        products = problem.input_products()                          # (b, d2, n)
        ext = products[..., : layout.ext_dim, :]                    # x~, (b, D + 1, n)
        if rows is not None and sample_blocked(factors.shape[-2], products.shape[-2]):
            # the Gram gathers the rows block by block (no copy of the input products), the
            # gradient gathers its factors and x~ (a few rows of n numbers per problem)
            gram = factor_gram(factors, products, rows)
            weighted = factors.index_select(0, rows).mul_(r.index_select(0, rows).unsqueeze(-2))
            grad = torch.bmm(weighted, ext.index_select(0, rows).transpose(-1, -2))
            rows = None
        else:
            # a stack of at most half the rows is gathered; otherwise all rows are computed and
            # the wanted ones picked (cheaper than copying the input products)
            if rows is not None and 2 * rows.numel() <= factors.shape[0]:
                factors, products, ext, r = factors[rows], products[rows], ext[rows], r[rows]
                rows = None
            gram = factor_gram(factors, products)                              # (b, m2, d2)
            grad = torch.bmm(factors * r.unsqueeze(-2), ext.transpose(-1, -2))  # (b, m, D + 1)
        gram_index, grad_index = layout.indices(gram.device)
        A = gram.flatten(-2)[..., gram_index]
        g = grad.flatten(-2)[..., grad_index]
        return take_rows(rows, A), take_rows(rows, g)


def rows_where(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices where ``mask`` holds, or ``None`` when it holds everywhere (no gather)."""
    if bool(mask.all()):
        return None
    return torch.nonzero(mask).squeeze(-1)


def take_rows(index: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """``t`` at the rows ``index`` of :func:`rows_where` (``t`` itself when ``index`` is ``None``)."""
    return t if index is None else t[index]


def _pair_index(i: torch.Tensor, j: torch.Tensor, m: int) -> torch.Tensor:
    """Row of the pair ``(min(i, j), max(i, j))`` in the layout of :func:`pair_products`."""
    a, c = torch.minimum(i, j), torch.maximum(i, j)
    return a * m - a * (a - 1) // 2 + (c - a)


class KhatriRaoLayout:
    """How the columns of a Jacobian given as column blocks map onto ``u ⊗ x~``.

    Every column of a :data:`Piece` list is ``u_a`` (a plain block) or ``u_a x_d`` (an outer
    block), with ``u`` the concatenation of the distinct blocks (``m`` factors) and
    ``x~ = (1, x)``: column ``c`` is ``u_{a_c} x~_{p_c}``. Then
    ``(J^T J)[c, c'] = sum_i u_{i a_c} u_{i a_c'} x~_{i p_c} x~_{i p_c'}``, an entry of the
    ``m(m+1)/2 x (D+1)(D+2)/2`` matrix of factor-pair by input-pair products, and
    ``(J^T r)[c] = sum_i u_{i a_c} r_i x~_{i p_c}``.
    """

    def __init__(self, slots: list[int], widths: list[int], outer: list[bool], input_dim: int) -> None:
        self.slots, self.widths, self.ext_dim = slots, widths, input_dim + 1
        offsets = [sum(widths[:s]) for s in range(len(widths))]
        self.n_factors = sum(widths)
        factor, coord = [], []
        for slot, is_outer in zip(slots, outer, strict=True):
            for j in range(widths[slot]):
                a = offsets[slot] + j
                if is_outer:
                    factor += [a] * input_dim
                    coord += list(range(1, input_dim + 1))
                else:
                    factor.append(a)
                    coord.append(0)
        fa, px = torch.tensor(factor), torch.tensor(coord)
        d2 = self.ext_dim * (self.ext_dim + 1) // 2
        self._gram_index = (_pair_index(fa[:, None], fa[None, :], self.n_factors) * d2
                            + _pair_index(px[:, None], px[None, :], self.ext_dim))
        self._grad_index = fa * self.ext_dim + px
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def n_columns(self) -> int:
        return int(self._grad_index.numel())

    def cost_ratio(self) -> float:
        """Products per sample of the factored ``J^T J`` over those of ``J^T J`` (``P^2``)."""
        m, d = self.n_factors, self.ext_dim
        return (m * (m + 1) // 2) * (d * (d + 1) // 2) / max(self.n_columns, 1) ** 2

    def memory_ratio(self) -> float:
        """Numbers per sample the factored form keeps, over ``P``: the input products (twice,
        while the stack of active problems is gathered anew) and the factor-pair products."""
        m, d = self.n_factors, self.ext_dim
        return (2 * (d * (d + 1) // 2) + m * (m + 1) // 2) / max(self.n_columns, 1)

    def factors(self, pieces: list[Piece]) -> torch.Tensor:
        """The distinct blocks side by side, transposed: ``(b, m, n)``.

        When the blocks already lie side by side in one buffer (each a ``(b, w, n)`` slice of
        one ``(b, m, n)`` array, in slot order, as :meth:`HMoE.jacobian_factors` writes them),
        that array is returned as a view instead of a copy."""
        distinct: dict[int, torch.Tensor] = {}
        for (g, _), slot in zip(pieces, self.slots, strict=True):
            distinct.setdefault(slot, g)
        blocks = [distinct[s].transpose(-1, -2) for s in range(len(self.widths))]
        joined = side_by_side(blocks)
        return torch.cat(blocks, -2) if joined is None else joined

    def indices(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather indices ``(P, P)`` into the flattened pair-product matrix and ``(P,)`` into
        the flattened ``(m, D + 1)`` gradient matrix, on ``device``."""
        if device not in self._on:
            self._on[device] = (self._gram_index.to(device), self._grad_index.to(device))
        return self._on[device]


_LAYOUTS: dict[tuple[object, ...], KhatriRaoLayout | None] = {}
#: the factored normal equations are used when they need at most this share of the products of ``J^T J``
_KHATRI_RAO_MAX_COST = 0.5
#: ... and at most this many numbers per sample, in units of ``P``: with the residuals and the
#: blocks themselves this stays within the ``3 n P`` numbers per problem that
#: ``estimators.api.auto_chunk_size`` budgets for a model with an analytic Jacobian
_KHATRI_RAO_MAX_MEMORY = 2.5


def khatri_rao_layout(pieces: list[Piece], input_dim: int) -> KhatriRaoLayout | None:
    """The :class:`KhatriRaoLayout` of a list of column blocks, or ``None`` when forming
    ``J^T J`` from it would need more than half the products of ``J^T J`` itself, or more
    than ``2.5 n P`` numbers of memory per problem.

    Blocks are identified by tensor identity: a model that lists one tensor as a plain and an
    outer block (``beta_0`` and ``beta_1`` columns of one atom) declares one factor. Layouts
    are cached by the block structure.
    """
    slot_of: dict[int, int] = {}
    widths: list[int] = []
    slots: list[int] = []
    for g, _ in pieces:
        if id(g) not in slot_of:
            slot_of[id(g)] = len(widths)
            widths.append(int(g.shape[-1]))
        slots.append(slot_of[id(g)])
    outer = [bool(o) for _, o in pieces]
    key = (tuple(slots), tuple(widths), tuple(outer), input_dim)
    if key not in _LAYOUTS:
        layout = KhatriRaoLayout(slots, widths, outer, input_dim)
        cheaper = layout.cost_ratio() <= _KHATRI_RAO_MAX_COST and layout.memory_ratio() <= _KHATRI_RAO_MAX_MEMORY
        _LAYOUTS[key] = layout if layout.n_columns and cheaper else None
    return _LAYOUTS[key]


def normal_equations(problem: Problem, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked residuals ``r`` ``(b, n)``, ``A = J^T J`` ``(b, P, P)`` and ``g = J^T r`` ``(b, P)``
    (:meth:`Problem.linearize`, then :meth:`Linearization.normal_equations`)."""
    lin = problem.linearize(theta)
    A, g = lin.normal_equations()
    return lin.r, A, g


def autograd_value_and_jacobian(model: MixtureModel, theta: torch.Tensor,
                                X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f`` ``(b, n)`` and its Jacobian ``(b, n, P)`` by reverse mode, for any model.

    One reverse pass through a copy of the parameters *per sample*: ``theta_b`` is
    expanded to ``(b, n, P)``, sample ``i`` is evaluated with its own copy (``X`` as
    ``(b, n, 1, D)``), and the gradient of ``sum_i f_i`` with respect to the copies is
    row ``i`` of the Jacobian, since ``f_i`` depends on copy ``i`` only. This costs a
    few forward passes instead of the ``P`` of forward mode, and no block between
    different problems (or samples) is ever formed.
    """
    b, n = X.shape[:2]
    with torch.enable_grad():
        copies = theta.detach().unsqueeze(-2).expand(b, n, theta.shape[-1]).requires_grad_(True)
        f = model.predict(model.unflatten(copies), X.unsqueeze(-2), check=False).squeeze(-1)
        (jac,) = torch.autograd.grad(f.sum(), copies)
    return f.detach(), jac


def risk_and_gradient(problem: Problem, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empirical risk ``RSS_b / n_b`` ``(b,)`` and its gradient ``(b, P)`` (reverse mode).

    Each problem's risk depends on its own ``theta_b`` only, so the gradient of the sum
    over problems is the stack of the per-problem gradients.
    """
    with torch.enable_grad():
        th = theta.detach().requires_grad_(True)
        risk = problem.residual(th).square().sum(-1) / problem.n_eff
        (grad,) = torch.autograd.grad(risk.sum(), th)
    return risk.detach(), grad


def projected_gradient(grad: torch.Tensor, theta: torch.Tensor, lo: torch.Tensor,
                       hi: torch.Tensor) -> torch.Tensor:
    """Gradient with the components that push out of the box at an active bound set to zero.

    ``grad`` is the gradient of the objective (a descent step moves along ``-grad``).
    """
    blocked = ((theta <= lo) & (grad > 0)) | ((theta >= hi) & (grad < 0))
    return torch.where(blocked, torch.zeros_like(grad), grad)


def gradient_small(grad: torch.Tensor, theta: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                   risk: torch.Tensor, gtol: float) -> torch.Tensor:
    """The gradient test: ``||projected grad of RSS/n||_inf <= gtol * RSS/n`` (scale free).

    Relative to the risk so that the same ``gtol`` means the same thing for noisy data
    (risk near the noise variance) and noise-free data (risk going to zero, where an
    absolute test would stop while the parameters are still far from the solution).
    """
    return projected_gradient(grad, theta, lo, hi).abs().amax(-1) <= gtol * risk


#: why a fit stopped (the certificate's ``stop_reason``; ``SolverOutput.stop`` holds the index):
#: the converging tests ``gtol``, ``ftol``, ``xtol``, ``zero_risk`` (the strict tests) and
#: ``resolution`` (no step lowers the risk by a statistically visible amount, ``_lm_scheme.resolution_test``);
#: the others stop a fit that is not converged: ``max_iter`` (the cap, or the fixed epochs of
#: ``sgd-paper``), ``damping`` (the LM's damping ran past its limit), ``diverged``
STOP_REASONS = ("gtol", "ftol", "xtol", "zero_risk", "resolution", "max_iter", "damping", "diverged")
#: the reasons that mean ``converged``
CONVERGED_REASONS = frozenset(STOP_REASONS[:5])


def stop_code(reason: str) -> int:
    """The index of ``reason`` in :data:`STOP_REASONS`."""
    return STOP_REASONS.index(reason)


@dataclass
class SolverOutput:
    """What every solver returns, per problem ``(B,)`` (parameters ``(B, P)``).

    ``stop`` is the index into :data:`STOP_REASONS` of the test that stopped each problem."""

    theta: torch.Tensor
    n_iter: torch.Tensor
    rel_change: torch.Tensor
    converged: torch.Tensor
    diverged: torch.Tensor
    stop: torch.Tensor

