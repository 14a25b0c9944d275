"""Exact representations of a truth, loss floors, and Jacobian spectra (pure math, no I/O).

A Voronoi loss measures the distance between mixing measures; a regression function can have
many exactly equal representations in an over-specified class. When a representation
reproduces ``f*`` exactly but has a positive loss, no amount of data drives that loss to zero
for an estimator that lands there: the loss has a *floor* on the model class. This module
lists the known exact reparametrisations (:func:`exact_representations`), takes the largest
loss over them (:func:`loss_floor`), and measures local identifiability at the true size by the
singular values of the Jacobian of ``f`` (:func:`jacobian_spectrum`, :func:`nonidentifiable_reason`).

Families of exact representations (``paper_notes/07_diagnostics.md``). ``k*`` true atoms per
group (a group is a head of an HMoE, the whole model for a flat MoE), ``k`` fitted ones.
Unless a family says otherwise the fitted atoms are the **base split**: atom ``i`` copies true
atom ``i mod k*`` (as :func:`hmoe_sim.estimators.init.split_atoms`); a true atom used ``m``
times gives its copies the mass ``w*/m`` under softmax gating (the numerators add up) and the
expert ``(a*, b*)/m`` under sigmoid gating (the gates do not add up; exact for linear and ReLU
experts). With sigmoid gating and tanh experts, where no expert split is exact, the extra atoms
are **null atoms**: zero expert ``a = 0, b = 0`` (contribution exactly 0), gate of their true
atom. With softmax gating no null atom is exact (a mass that vanishes exists only at
``beta_0 = -inf``, outside every box), so extra atoms are always mass-split copies. Every family
is applied in every group, to true atom 0 and its first copy (atom ``k*``):

``mass split`` (softmax, flat or non-shared HMoE)
    masses ``(1 + delta) w*/m`` and ``(1 - delta) w*/m``; D1 = D2 = 0 up to round-off.
``linear split`` (linear experts, either gate)
    experts ``(a, b) +- delta u``, ``u`` the unit vector ``(1, ..., 1)/sqrt(D + 1)``.
``rescaling split`` (softmax, ReLU or linear experts)
    experts ``(1 + delta) (a, b)`` and ``(1 - delta) (a, b)`` at equal masses: positive
    homogeneity traded against the masses, ``m_1 c_1 + m_2 c_2 = m_1 + m_2``. Softmax has no
    rescaling at the true size: a constant factor on one numerator also changes the normaliser.
``expert-halving split`` (sigmoid, ReLU or linear experts)
    experts ``(1 + delta) (a, b)/m`` and ``(1 - delta) (a, b)/m`` under the same gate
    (``delta = 0`` is the split start of ``init_near_truth``).
``null-expert atom`` (sigmoid, every expert)
    atom ``k*`` has a zero expert and the gate ``(beta_0* + delta, beta_1*)`` of true atom 0.
``gate rescaling`` (sigmoid, ReLU or linear experts, a true atom with zero gate slope)
    ``beta_0 -> beta_0 + delta`` and ``(a, b) -> (a, b) sigmoid(beta_0)/sigmoid(beta_0 + delta)``
    on the first zero-slope atom; exists at the true size.
``constant-gate transfer`` (sigmoid, linear experts, two true atoms with zero slope)
    ``(a, b)_i += delta u / sigmoid(beta_0i)``, ``(a, b)_j -= delta u / sigmoid(beta_0j)``;
    exists at the true size.
``translation`` (flat softmax without anchors)
    every ``beta_0`` shifted by ``delta``; exists at the true size.
``duplicated codes`` (shared HMoE)
    the base split copies the codes ``z``; masses ``(1 +- delta) w*/m`` as in the mass split.
``gauge`` (shared HMoE)
    ``W -> W M``, ``w_3 -> M^T w_3``, ``z -> M^{-1} z`` with ``M = I + delta A`` (``A`` a fixed
    matrix of unit Frobenius norm); the generated atoms do not change; exists at the true size.

Every returned representation is checked to reproduce ``f*`` to ``1e-10`` (relative to
``max(1, max |f*|)``) by ``predict`` on 2000 random inputs (uniform on ``[-1, 1]^D`` and
Gaussian of scale 3), and a failure raises ``RuntimeError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import torch

from hmoe_sim._validation import check_choice, check_positive_float, check_positive_int
from hmoe_sim.losses import eval_sample, voronoi_losses_for
from hmoe_sim.models.base import MixtureModel, Params
from hmoe_sim.models.flat import FlatMoE
from hmoe_sim.models.hmoe import HMoE
from hmoe_sim.models.presets import make_preset

__all__ = [
    "DIAGNOSTIC_CASES",
    "FLOOR_KINDS",
    "FlatDirections",
    "GAUGE_MODES",
    "LOSS_MOVE_TOL",
    "JacobianSpectrum",
    "Case",
    "exact_representations",
    "flat_directions",
    "floor_table",
    "gate_logit_spread",
    "gauge_directions",
    "jacobian_spectrum",
    "loss_floor",
    "nonidentifiable_reason",
    "parameter_names",
    "representation_losses",
    "spectrum_table",
]

#: loss kinds accepted by :func:`loss_floor` (``"L2"`` is a function of ``f``: its floor is 0)
FLOOR_KINDS = ("D1", "D2", "L2")
#: ``"remove"``: spectrum on the complement of the gauge directions; ``"keep"``: of the full Jacobian
GAUGE_MODES = ("remove", "keep")
#: tolerance of the exactness check, relative to ``max(1, max |f*|)``
EXACT_TOL = 1e-10

# atom-indexed parameter names and the axis of the atom index, per model family
_FLAT_ATOM_AXIS = {"beta0": 0, "beta1": 0, "a": 0, "b": 0}
_HMOE_ATOM_AXIS = {"beta0": 1, "beta1": 1, "a": 1, "b": 1, "z": 1}


# ----------------------------------------------------------------------------- model checks
def _check_pair(fit_model: MixtureModel, true_model: MixtureModel, truth: Params) -> None:
    """Same family and structure, ``fit_model`` at least as large; ``truth`` unbatched."""
    if type(fit_model) is not type(true_model) or not isinstance(fit_model, FlatMoE | HMoE):
        raise TypeError(f"fit_model ({type(fit_model).__name__}) and true_model ({type(true_model).__name__}) "
                        "must both be FlatMoE or both HMoE")
    if fit_model.input_dim != true_model.input_dim:
        raise ValueError(f"fit_model has input_dim={fit_model.input_dim} but true_model {true_model.input_dim}")
    if isinstance(fit_model, FlatMoE):
        assert isinstance(true_model, FlatMoE)
        for attr in ("gate", "expert"):
            if getattr(fit_model, attr) != getattr(true_model, attr):
                raise ValueError(f"fit_model has {attr}={getattr(fit_model, attr)!r} but true_model "
                                 f"{getattr(true_model, attr)!r}")
        if (fit_model.anchors is None) != (true_model.anchors is None) or (
                fit_model.anchors is not None and true_model.anchors is not None
                and any(not torch.equal(fit_model.anchors[k], true_model.anchors[k]) for k in fit_model.anchors)):
            raise ValueError("fit_model and true_model have different anchor experts")
    else:
        assert isinstance(true_model, HMoE)
        att_f, att_t = fit_model.attention, true_model.attention
        if att_f is not att_t and not all(torch.equal(getattr(att_f, k), getattr(att_t, k))
                                          for k in ("query", "key", "value", "readout")):
            raise ValueError("fit_model and true_model use different frozen attention layers")
        for attr in ("structure", "code_dim", "code_activation", "first_level", "n_tokens"):
            if getattr(fit_model, attr) != getattr(true_model, attr):
                raise ValueError(f"fit_model has {attr}={getattr(fit_model, attr)!r} but true_model "
                                 f"{getattr(true_model, attr)!r}")
    if _atoms_per_group(fit_model) < _atoms_per_group(true_model):
        raise ValueError(f"fit_model has {_atoms_per_group(fit_model)} atoms per group, fewer than the "
                         f"truth's {_atoms_per_group(true_model)}")
    if len(true_model.batch_shape(truth)):
        raise ValueError(f"truth must be unbatched, got batch shape {tuple(true_model.batch_shape(truth))}")


def _atoms_per_group(model: MixtureModel) -> int:
    return model.n_adapters if isinstance(model, HMoE) else model.n_atoms


def _gate(model: MixtureModel) -> str:
    return model.gate if isinstance(model, FlatMoE) else "softmax"


def _expert(model: MixtureModel) -> str:
    """Expert activation of the atoms (``"codes"`` for a shared HMoE, whose atoms are generated)."""
    if isinstance(model, FlatMoE):
        return model.expert
    assert isinstance(model, HMoE)
    return "identity" if model.structure == "nonshared" else "codes"


# ----------------------------------------------------------------------------- grouped view
def _to_grouped(model: MixtureModel, params: Params) -> Params:
    """Atom-indexed tensors with a leading group axis (a flat MoE is one group); float64 copies."""
    out = {k: v.detach().to(dtype=torch.float64, device="cpu").clone() for k, v in params.items()}
    if isinstance(model, FlatMoE):
        out = {k: v.unsqueeze(0) for k, v in out.items()}
    return out


def _from_grouped(model: MixtureModel, grouped: Params) -> Params:
    if isinstance(model, FlatMoE):
        return {k: v.squeeze(0).contiguous() for k, v in grouped.items()}
    return {k: v.contiguous() for k, v in grouped.items()}


def _atom_names(model: MixtureModel) -> tuple[str, ...]:
    if isinstance(model, FlatMoE):
        return tuple(_FLAT_ATOM_AXIS)
    return tuple(k for k in _HMOE_ATOM_AXIS if k in model.param_shapes())


@dataclass
class _Split:
    """Per group: the true atom each fitted atom copies, and whether it is a null atom."""

    source: list[int]
    null: list[bool]


def _default_split(fit_model: MixtureModel, k_true: int) -> _Split:
    k_fit = _atoms_per_group(fit_model)
    source = [i % k_true for i in range(k_fit)]
    tanh_sigmoid = _gate(fit_model) == "sigmoid" and _expert(fit_model) == "tanh"
    return _Split(source, [tanh_sigmoid and i >= k_true for i in range(k_fit)])


def _build(fit_model: MixtureModel, true_model: MixtureModel, truth: Params, split: _Split) -> Params:
    """The grouped base representation of ``split`` (exact by construction)."""
    grouped = _to_grouped(true_model, truth)
    k_true = _atoms_per_group(true_model)
    index = torch.as_tensor(split.source)
    out = {k: (v.index_select(1, index) if k in _atom_names(fit_model) else v.clone()) for k, v in grouped.items()}
    null = torch.as_tensor(split.null)
    counts = np.bincount([s for s, n in zip(split.source, split.null, strict=True) if not n], minlength=k_true)
    if (counts == 0).any():
        raise AssertionError(f"every true atom needs a non-null copy, got counts {counts.tolist()}")
    copies = torch.as_tensor(counts[split.source], dtype=torch.float64)
    if _gate(fit_model) == "softmax":
        if bool(null.any()):
            raise AssertionError("null atoms are not exact under softmax gating")
        out["beta0"] = out["beta0"] - torch.log(copies)
    else:
        keep = (~null).to(torch.float64) / copies
        out["a"] = out["a"] * keep.unsqueeze(-1)
        out["b"] = out["b"] * keep
    return out


def _unit_expert_direction(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``u = (1, ..., 1)/sqrt(D + 1)`` split into its ``a`` part ``(D,)`` and ``b`` part ``()``."""
    c = 1.0 / math.sqrt(d + 1)
    return torch.full((d,), c, dtype=torch.float64), torch.tensor(c, dtype=torch.float64)


def _gauge_matrix(q: int) -> torch.Tensor:
    """A fixed ``(q, q)`` matrix of unit Frobenius norm, not symmetric (generic direction of GL(q))."""
    a = torch.arange(q * q, dtype=torch.float64).reshape(q, q)
    a = a - a.mean() + torch.eye(q, dtype=torch.float64)
    return a / torch.linalg.matrix_norm(a)


# ----------------------------------------------------------------------------- families
_Family = Callable[[Params, float], Params]


def _families(fit_model: MixtureModel, true_model: MixtureModel, truth: Params
              ) -> list[tuple[str, _Split, _Family]]:
    """``(name, split, move)`` for every family that exists for this pair of models."""
    k_true = _atoms_per_group(true_model)
    k_fit = _atoms_per_group(fit_model)
    extra = k_fit > k_true
    gate, expert = _gate(fit_model), _expert(fit_model)
    base = _default_split(fit_model, k_true)
    pair = (0, k_true)  # true atom 0 and its first copy
    out: list[tuple[str, _Split, _Family]] = []

    def scale_pair(p: Params, delta: float) -> Params:
        for i, c in zip(pair, (1 + delta, 1 - delta), strict=True):
            p["a"][:, i] *= c
            p["b"][:, i] *= c
        return p

    if extra and gate == "softmax":
        def mass_split(p: Params, delta: float) -> Params:
            p["beta0"][:, pair[0]] += math.log1p(delta)
            p["beta0"][:, pair[1]] += math.log1p(-delta)
            return p
        out.append(("duplicated codes" if expert == "codes" else "mass split", base, mass_split))
    if extra and expert == "identity":
        ua, ub = _unit_expert_direction(fit_model.input_dim)

        def linear_split(p: Params, delta: float) -> Params:
            for i, sign in zip(pair, (1.0, -1.0), strict=True):
                p["a"][:, i] += sign * delta * ua
                p["b"][:, i] += sign * delta * ub
            return p
        out.append(("linear split", base, linear_split))
    if extra and expert in ("identity", "relu"):
        out.append(("rescaling split" if gate == "softmax" else "expert-halving split", base, scale_pair))
    if extra and gate == "sigmoid":
        null_split = _Split(list(base.source), [n or i == k_true for i, n in enumerate(base.null)])

        def null_atom(p: Params, delta: float) -> Params:
            p["beta0"][:, k_true] += delta
            return p
        out.append(("null-expert atom", null_split, null_atom))
    if gate == "sigmoid" and expert in ("identity", "relu"):
        slopes = truth["beta1"].reshape(-1, fit_model.input_dim)
        zero = [i for i in range(k_true) if bool((slopes[i] == 0).all())]
        if zero:
            j = zero[0]

            def gate_rescaling(p: Params, delta: float) -> Params:
                b0 = p["beta0"][:, j].clone()
                c = torch.sigmoid(b0) / torch.sigmoid(b0 + delta)
                p["beta0"][:, j] += delta
                p["a"][:, j] *= c.unsqueeze(-1)
                p["b"][:, j] *= c
                return p
            out.append(("gate rescaling", base, gate_rescaling))
        if expert == "identity" and len(zero) >= 2:
            i1, i2 = zero[:2]
            ua, ub = _unit_expert_direction(fit_model.input_dim)

            def transfer(p: Params, delta: float) -> Params:
                for i, sign in ((i1, 1.0), (i2, -1.0)):
                    s = torch.sigmoid(p["beta0"][:, i]).unsqueeze(-1)
                    p["a"][:, i] += sign * delta * ua / s
                    p["b"][:, i] += sign * delta * ub / s.squeeze(-1)
                return p
            out.append(("constant-gate transfer", base, transfer))
    if isinstance(fit_model, FlatMoE) and gate == "softmax" and fit_model.anchors is None:
        def translation(p: Params, delta: float) -> Params:
            p["beta0"] += delta
            return p
        out.append(("translation", base, translation))
    if expert == "codes":
        def gauge(p: Params, delta: float) -> Params:
            q = p["z"].shape[-1]
            m = torch.eye(q, dtype=torch.float64) + delta * _gauge_matrix(q)
            p["W1"], p["W2"], p["w3"] = p["W1"] @ m, p["W2"] @ m, m.T @ p["w3"]
            p["z"] = torch.linalg.solve(m, p["z"].unsqueeze(-1)).squeeze(-1)
            return p
        out.append(("gauge", base, gauge))
    return out


def _check_inputs_sample(d: int) -> torch.Tensor:
    rng = np.random.default_rng(20_251_129)
    x = np.concatenate([rng.uniform(-1.0, 1.0, (1000, d)), 3.0 * rng.standard_normal((1000, d))])
    return torch.from_numpy(x)


def exact_representations(
    fit_model: MixtureModel,
    true_model: MixtureModel,
    truth: Params,
    delta: float = 0.1,
) -> list[tuple[str, Params]]:
    """The known exact reparametrisations of ``truth`` in ``fit_model``'s class.

    Parameters
    ----------
    fit_model : FlatMoE or HMoE
        The fitted model (``k >= k*`` atoms per group), same family and structure as
        ``true_model``.
    true_model : FlatMoE or HMoE
        The true model.
    truth : dict of torch.Tensor
        Unbatched true parameters of ``true_model``.
    delta : float, default 0.1
        Distance moved along each family, in ``(0, 1)`` (mass and scale factors ``1 +- delta``
        must stay positive).

    Returns
    -------
    list of (str, dict of torch.Tensor)
        ``(family name, unbatched float64 parameters of fit_model)``; the families are listed in
        the module docstring. Families that need an extra atom are absent at the true size;
        ``[]`` when no family applies.

    Raises
    ------
    TypeError, ValueError
        Models of different families or structures, fewer fitted than true atoms, a batched
        truth, ``delta`` outside ``(0, 1)``.
    RuntimeError
        A representation does not reproduce ``f*`` to ``1e-10`` (a bug, never expected).
    """
    _check_pair(fit_model, true_model, truth)
    delta = check_positive_float("delta", delta)
    if delta >= 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta!r}")
    X = _check_inputs_sample(fit_model.input_dim)
    truth64 = true_model.cast(truth, device="cpu", dtype=torch.float64)
    f_true = true_model.predict(truth64, X)
    scale = max(1.0, float(f_true.abs().max()))
    out: list[tuple[str, Params]] = []
    for name, split, move in _families(fit_model, true_model, truth64):
        params = _from_grouped(fit_model, move(_build(fit_model, true_model, truth64, split), delta))
        error = float((fit_model.predict(params, X) - f_true).abs().max())
        if not error <= EXACT_TOL * scale:
            raise RuntimeError(f"exact representation {name!r} misses f* by {error:.3g} (tolerance "
                               f"{EXACT_TOL * scale:.3g}); this is a bug in hmoe_sim.identifiability")
        out.append((name, params))
    return out


def representation_losses(
    fit_model: MixtureModel,
    true_model: MixtureModel,
    truth: Params,
    *,
    kinds: tuple[str, ...] = ("D1", "D2"),
    r: float = 1,
    delta: float = 0.1,
) -> dict[str, dict[str, float]]:
    """Voronoi losses of every exact representation: ``{family: {kind: loss}}``.

    Losses are :func:`hmoe_sim.losses.voronoi_losses_for` ``(fit_model, params, true_model,
    truth, kinds=kinds, r=r)``, the sweep's scoring convention.
    """
    for kind in kinds:
        check_choice("kind", kind, ("D1", "D2"))
    reps = exact_representations(fit_model, true_model, truth, delta)
    out: dict[str, dict[str, float]] = {}
    for name, params in reps:
        losses = voronoi_losses_for(fit_model, params, true_model, truth, kinds=kinds, r=r)
        out[name] = {kind: float(v) for kind, v in losses.items()}
    return out


def loss_floor(
    fit_model: MixtureModel,
    true_model: MixtureModel,
    truth: Params,
    kind: str,
    r: float = 1,
    delta: float = 0.1,
) -> float:
    """Largest loss ``kind`` over the exact representations of ``truth`` at ``delta``.

    A property of the loss on the model class, not a measured level: a positive floor says the
    loss is not a function of ``f`` there, so an estimator that lands on an exact representation
    can keep a loss of that size at every ``n``.

    Parameters
    ----------
    fit_model, true_model, truth, delta
        As in :func:`exact_representations`.
    kind : {"D1", "D2", "L2"}
        ``"L2"`` returns ``0.0`` (a function of ``f``, zero on every exact representation).
    r : float, default 1
        Exponent of ``D2``.

    Returns
    -------
    float
        The floor; ``0.0`` when no exact representation exists.
    """
    kind = check_choice("kind", kind, FLOOR_KINDS)
    if kind == "L2":
        _check_pair(fit_model, true_model, truth)
        return 0.0
    losses = representation_losses(fit_model, true_model, truth, kinds=(kind,), r=r, delta=delta)
    return max((v[kind] for v in losses.values()), default=0.0)


# ----------------------------------------------------------------------------- Jacobian spectra
@dataclass(frozen=True)
class JacobianSpectrum:
    """Singular values of ``J / sqrt(n)``, ``J`` the Jacobian of ``f`` on ``n`` inputs.

    Attributes
    ----------
    singular_values : numpy.ndarray
        Descending, one per direction: ``n_params - n_gauge`` values on the complement of the
        gauge directions (``gauge="remove"``) or ``n_params`` of the full Jacobian
        (``gauge="keep"``); with fewer inputs than directions the missing ones are exact zeros.
    gauge_singular_values : numpy.ndarray
        Descending singular values of ``J / sqrt(n)`` restricted to the gauge directions
        (zero up to round-off); empty when the model has no gauge.
    n_params : int
        Number of free scalars of the model.
    """

    singular_values: np.ndarray
    gauge_singular_values: np.ndarray
    n_params: int

    @property
    def n_gauge(self) -> int:
        """Number of gauge directions."""
        return int(self.gauge_singular_values.shape[0])

    @property
    def ratio(self) -> float:
        """Smallest over largest singular value (``0.0`` for a zero Jacobian)."""
        s = self.singular_values
        return float(s[-1] / s[0]) if s.size and s[0] > 0 else 0.0


def gauge_directions(model: MixtureModel, params: Params) -> torch.Tensor:
    """Orthonormal basis ``(n_params, m)`` of the known gauge directions at ``params``.

    Shared HMoE: the ``q^2`` tangents of ``W -> W M``, ``w_3 -> M^T w_3``, ``z -> M^{-1} z`` at
    ``M = I`` (``dW = W E``, ``dw_3 = E^T w_3``, ``dz = -E z`` for the ``q^2`` unit matrices ``E``).
    Flat softmax without anchors: the ``D + 1`` common shifts of ``(beta_0, beta_1)``.
    Every other model: none (``m = 0``). Directions of rank-deficient tangents are dropped.
    """
    if len(model.batch_shape(params)):
        raise ValueError("gauge_directions needs unbatched params")
    p = {k: v.detach().to(dtype=torch.float64, device="cpu") for k, v in params.items()}
    tangents: list[Params] = []
    zero = {k: torch.zeros_like(v) for k, v in p.items()}
    if isinstance(model, HMoE) and model.structure == "shared":
        q = model.code_dim
        for a in range(q):
            for b in range(q):
                e = torch.zeros(q, q, dtype=torch.float64)
                e[a, b] = 1.0
                t = dict(zero)
                t.update(W1=p["W1"] @ e, W2=p["W2"] @ e, w3=e.T @ p["w3"], z=-(p["z"] @ e.T))
                tangents.append(t)
    elif isinstance(model, FlatMoE) and model.gate == "softmax" and model.anchors is None:
        t = dict(zero)
        t["beta0"] = torch.ones_like(p["beta0"])
        tangents.append(t)
        for d in range(model.input_dim):
            t = dict(zero)
            t["beta1"] = torch.zeros_like(p["beta1"])
            t["beta1"][:, d] = 1.0
            tangents.append(t)
    if not tangents:
        return torch.zeros(model.n_params, 0, dtype=torch.float64)
    mat = torch.stack([model.flatten(t) for t in tangents], dim=1)
    u, s, _ = torch.linalg.svd(mat, full_matrices=False)
    rank = int((s > 1e-12 * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return u[:, :rank]


def _jacobian(model: MixtureModel, params: Params, X: torch.Tensor) -> torch.Tensor:
    """``(n, n_params)`` Jacobian: the model's analytic one, else forward-mode autodiff."""
    value_and_jacobian = getattr(model, "value_and_jacobian", None)
    if value_and_jacobian is not None:
        return value_and_jacobian(params, X)[1]
    theta = model.flatten(params)
    return torch.func.jacfwd(lambda t: model.predict(model.unflatten(t), X, check=False))(theta)


def jacobian_spectrum(
    model: MixtureModel,
    params: Params,
    X: torch.Tensor,
    gauge: str = "remove",
) -> JacobianSpectrum:
    """Singular values of ``J / sqrt(n)`` at ``params`` on the inputs ``X``, gauge reported apart.

    Parameters
    ----------
    model : MixtureModel
        Model (its analytic Jacobian is used when it has one, else ``torch.func.jacfwd``).
    params : dict of torch.Tensor
        Unbatched parameters; computed in float64.
    X : torch.Tensor
        ``(n, D)`` inputs.
    gauge : {"remove", "keep"}
        ``"remove"``: the spectrum of ``J`` restricted to the orthogonal complement of
        :func:`gauge_directions`; ``"keep"``: of the full ``J``. Either way the spectrum on the
        gauge directions is returned apart.

    Returns
    -------
    JacobianSpectrum
    """
    gauge = check_choice("gauge", gauge, GAUGE_MODES)
    if len(model.batch_shape(params)):
        raise ValueError("jacobian_spectrum needs unbatched params")
    if not isinstance(X, torch.Tensor) or X.dim() != 2 or X.shape[-1] != model.input_dim:
        raise ValueError(f"X must be a (n, {model.input_dim}) tensor, got "
                         f"{tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}")
    p64 = model.cast(params, device="cpu", dtype=torch.float64)
    X64 = X.detach().to(dtype=torch.float64, device="cpu")
    model._check_inputs(p64, X64, check_finite=True)
    J = _jacobian(model, p64, X64) / math.sqrt(X64.shape[0])
    basis = gauge_directions(model, p64)
    gauge_sv = torch.linalg.svdvals(J @ basis) if basis.shape[1] else torch.zeros(0, dtype=torch.float64)
    if gauge == "remove" and basis.shape[1]:
        u, _, _ = torch.linalg.svd(basis, full_matrices=True)
        J = J @ u[:, basis.shape[1]:]
    values = torch.linalg.svdvals(J)
    # fewer inputs than directions: the missing singular values are exact zeros
    values = torch.cat([values, values.new_zeros(J.shape[1] - values.shape[0])])
    return JacobianSpectrum(values.numpy(), gauge_sv.numpy(), model.n_params)


def parameter_names(model: MixtureModel) -> list[str]:
    """Names of the flattened coordinates, ``"a[1,3]"`` style, in :meth:`flatten` order."""
    names = []
    for name, shape in model.param_shapes().items():
        names += [f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]
    return names


def gate_logit_spread(model: FlatMoE, params: Params, X: torch.Tensor) -> np.ndarray:
    """Standard deviation over the rows of ``X`` of each free atom's gate logit ``beta_1^T x``.

    The size of the signal that the gate carries: a spread near 0 is a constant gate.
    """
    if not isinstance(model, FlatMoE):
        raise TypeError(f"gate_logit_spread needs a FlatMoE, got {type(model).__name__}")
    model._check_inputs(params, X, check_finite=True)
    logits = X @ params["beta1"].transpose(-1, -2)
    return logits.std(dim=-2).detach().cpu().numpy()


# ----------------------------------------------------------------------------- presets
def _zero_directions(model: MixtureModel, params: Params, X: torch.Tensor, threshold: float) -> tuple[int, list[str]]:
    """Number of singular values below ``threshold`` x largest (gauge removed) and the coordinates
    that carry most of their right singular vectors."""
    p64 = model.cast(params, device="cpu", dtype=torch.float64)
    J = _jacobian(model, p64, X) / math.sqrt(X.shape[0])
    basis = gauge_directions(model, p64)
    comp = torch.linalg.svd(basis, full_matrices=True)[0][:, basis.shape[1]:] if basis.shape[1] else None
    Jc = J @ comp if comp is not None else J
    _, s, vh = torch.linalg.svd(Jc, full_matrices=False)
    small = s < threshold * s[0]
    if not bool(small.any()):
        return 0, []
    v = vh[small].T
    if comp is not None:
        v = comp @ v
    energy = (v**2).sum(-1)
    order = torch.argsort(energy, descending=True)
    names = parameter_names(model)
    top = [names[int(i)] for i in order[:8] if energy[int(i)] > 0.05 * energy[order[0]]]
    return int(small.sum()), top


def nonidentifiable_reason(
    preset: str,
    options: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    n_points: int = 10_000,
    threshold: float = 1e-6,
) -> str | None:
    """Why ``preset`` is not identifiable at its true size, or ``None`` when it is.

    Structural cases are named first (sigmoid gating with a zero-slope ReLU or linear atom;
    Regime 1 with linear experts, where ``f*`` is exactly linear). Otherwise the true-size
    Jacobian at the truth, gauge removed, on ``n_points`` inputs of
    :func:`hmoe_sim.losses.eval_sample` (seed 0, uniform) must have smallest/largest singular
    value ``> threshold``; if not, the reason names the coordinates that carry the (near-)zero
    directions.

    Parameters
    ----------
    preset : str
        A preset name of :data:`hmoe_sim.models.presets.PRESETS`.
    options : mapping, optional
        Preset option overrides (a sweep series' ``truth_options``).
    seed : int
        Truth seed.
    n_points : int
        Size of the input sample of the numerical check.
    threshold : float
        Smallest accepted ratio of singular values.

    Returns
    -------
    str or None
        A one-line reason naming the zero directions, or ``None``.
    """
    threshold = check_positive_float("threshold", threshold)
    n_points = check_positive_int("n_points", n_points)
    setup = make_preset(preset, seed=seed, **dict(options or {}))
    model, truth = setup.true_model, setup.truth
    if isinstance(model, FlatMoE) and model.gate == "sigmoid" and model.expert in ("identity", "relu"):
        slopes = truth["beta1"]
        zero = [i for i in range(model.n_atoms) if bool((slopes[i] == 0).all())]
        if model.expert == "identity" and len(zero) == model.n_atoms:
            return (f"{preset}: every gate slope is zero and the experts are linear, so f* is exactly linear "
                    "in x and only sum_i sigmoid(beta0_i) (a_i, b_i) is identifiable; zero directions: beta0_i "
                    "against the scale of (a_i, b_i) for every atom, and transfers of (a, b) between atoms")
        if zero:
            atoms = ", ".join(map(str, zero))
            return (f"{preset}: atom(s) {atoms} have zero gate slope and {model.expert} experts, so "
                    f"sigmoid(beta0_i) trades exactly against the scale of (a_i, b_i) (positive homogeneity); "
                    f"zero direction(s): (beta0_i, a_i, b_i) for i in {{{atoms}}}")
    X = eval_sample(model.input_dim, n_points, 0)
    count, top = _zero_directions(model, truth, X, threshold)
    if count:
        return (f"{preset}: the true-size Jacobian at the truth has {count} singular value(s) below "
                f"{threshold:g} x the largest (gauge removed); the zero directions load on {', '.join(top)}")
    return None


# ----------------------------------------------------------------------------- tables
#: ``(label, preset, option overrides, structure of the fit or None)``
Case = tuple[str, str, dict[str, Any], str | None]

_CALIBRATION = dict(input_dim=4, n_true=2, n_fit=3, gate_slope_std=2.0, expert_std=1.0, min_separation=1.0)
_FIGURE1 = dict(input_dim=32, n_true=8, n_fit=9, expert="relu")
_HEADLINE = dict(expert_std=2.0, gate_slope_std=2.0, attention_std=0.3, code_activation="identity")

#: the preset cases of ``paper_notes/07_diagnostics.md``: defaults, each expert kind of the sigmoid
#: regimes, the calibration truths (D = 4, gate sd 2, experts sd 1, separation 1), the sibling
#: papers' Figure 1 pair (d = 32, k* = 8, k = 9) and the headline HMoE truth with both fits
DIAGNOSTIC_CASES: tuple[Case, ...] = (
    ("softmax-linear", "softmax-linear", {}, None),
    ("softmax-relu", "softmax-relu", {}, None),
    ("softmax-tanh", "softmax-tanh", {}, None),
    ("softmax-linear calibration", "softmax-linear", _CALIBRATION, None),
    ("softmax-relu calibration", "softmax-relu", _CALIBRATION, None),
    ("softmax-tanh calibration", "softmax-tanh", _CALIBRATION, None),
    ("sigmoid-regime1 linear", "sigmoid-regime1", {"expert": "identity"}, None),
    ("sigmoid-regime1 relu", "sigmoid-regime1", {"expert": "relu"}, None),
    ("sigmoid-regime1 tanh", "sigmoid-regime1", {"expert": "tanh"}, None),
    ("sigmoid-regime2 linear", "sigmoid-regime2", {"expert": "identity"}, None),
    ("sigmoid-regime2 relu", "sigmoid-regime2", {"expert": "relu"}, None),
    ("sigmoid-regime2 tanh", "sigmoid-regime2", {"expert": "tanh"}, None),
    ("sigmoid-regime2 tanh, gate sd 2", "sigmoid-regime2", {"expert": "tanh", "gate_slope_std": 2.0,
                                                             "expert_std": 1.0}, None),
    ("figure 1 sigmoid (regime 2)", "sigmoid-regime2", _FIGURE1, None),
    ("figure 1 softmax (anchor)", "softmax-relu", dict(_FIGURE1, zero_gate_slopes=1), None),
    ("hmoe-nonshared", "hmoe-nonshared", {}, None),
    ("hmoe-shared", "hmoe-shared", {}, None),
    ("headline truth, shared fit", "hmoe-shared", _HEADLINE, None),
    ("headline truth, non-shared fit", "hmoe-shared", _HEADLINE, "nonshared"),
)


def _case_models(case: Case, seed: int) -> tuple[MixtureModel, MixtureModel, Params, dict[str, Any]]:
    """``(fit_model, true_model, truth, options)`` of a case, the truth in the fit's structure."""
    _, preset, options, structure = case
    setup = make_preset(preset, seed=seed, **options)
    fit_model, true_model, truth = setup.fit_model, setup.true_model, setup.truth
    if structure is not None:
        if not isinstance(true_model, HMoE) or not isinstance(fit_model, HMoE):
            raise ValueError(f"case {case[0]!r}: a fit structure needs an HMoE preset, got {preset!r}")
        fit_model = fit_model.with_structure(structure)
        true_model, truth = true_model.with_structure(structure), true_model.to_nonshared(truth)
    return fit_model, true_model, truth, setup.options


def floor_table(cases: tuple[Case, ...] = DIAGNOSTIC_CASES, *, seed: int = 0, delta: float = 0.1,
                r: float = 1) -> pd.DataFrame:
    """Losses of every exact representation, over-specified (``k``) and at the true size (``k*``).

    Returns
    -------
    pandas.DataFrame
        One row per case, size and family: ``case, size ("k" or "k*"), family, D1, D2``; a
        case with no family at a size gets one row with family ``"(none)"`` and losses 0.
    """
    rows = []
    for case in cases:
        fit_model, true_model, truth, _ = _case_models(case, seed)
        true_fit = fit_model.with_atoms(_atoms_per_group(true_model))
        for size, model in (("k", fit_model), ("k*", true_fit)):
            losses = representation_losses(model, true_model, truth, r=r, delta=delta)
            for family, values in (losses or {"(none)": {"D1": 0.0, "D2": 0.0}}).items():
                rows.append({"case": case[0], "size": size, "family": family, **values})
    return pd.DataFrame(rows)


def spectrum_table(cases: tuple[Case, ...] = DIAGNOSTIC_CASES, *, seed: int = 0, n_points: int = 10_000,
                   zero_tol: float = 1e-10) -> pd.DataFrame:
    """True-size Jacobian spectra at the truth and gate-logit spreads, one row per case.

    Columns: ``case, n_params, n_gauge, largest, smallest, ratio`` (gauge removed), ``n_zero``
    (singular values below ``zero_tol`` x the largest), ``gate_logit_sd`` (mean of
    :func:`gate_logit_spread` over the free atoms with a non-zero gate slope, 0 when there is
    none; flat models only, else NaN), ``reason`` (the
    structural or numerical reason of :func:`nonidentifiable_reason`, empty when identifiable).
    The inputs are :func:`hmoe_sim.losses.eval_sample` ``(D, n_points, 0)``.
    """
    rows = []
    for case in cases:
        _, true_model, truth, _ = _case_models(case, seed)
        X = eval_sample(true_model.input_dim, n_points, 0)
        spec = jacobian_spectrum(true_model, truth, X)
        s = spec.singular_values
        spread = float("nan")
        if isinstance(true_model, FlatMoE):
            per_atom = gate_logit_spread(true_model, truth, X)
            sloped = per_atom[(truth["beta1"] != 0).any(-1).numpy()]
            spread = float(sloped.mean()) if sloped.size else 0.0
        reason = nonidentifiable_reason(case[1], case[2], seed=seed, n_points=n_points) if case[3] is None else None
        rows.append({"case": case[0], "n_params": spec.n_params, "n_gauge": spec.n_gauge, "largest": float(s[0]),
                     "smallest": float(s[-1]), "ratio": spec.ratio, "n_zero": int((s < zero_tol * s[0]).sum()),
                     "gate_logit_sd": spread, "reason": reason or ""})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- flat directions of the class
class FlatDirections(NamedTuple):
    """Flat directions of the fitted-size Jacobian at the base split of the truth.

    Attributes
    ----------
    n_flat : int
        Singular values of ``J / sqrt(n)`` (gauge removed) below ``threshold`` x the largest.
    n_flat_loss : int
        How many of those directions move the loss: a step of ``step`` along the direction
        changes it by more than :data:`LOSS_MOVE_TOL` from its value at the base split (a
        second-order change counts: a mass trade of ``1e-4`` moves D1 by about ``1e-8``).
    """

    n_flat: int
    n_flat_loss: int


#: a loss change below this along a flat direction is round-off (losses are of order one)
LOSS_MOVE_TOL = 1e-10


def flat_directions(
    fit_model: MixtureModel,
    true_model: MixtureModel,
    truth: Params,
    kind: str,
    *,
    r: float = 1,
    n_points: int = 4000,
    threshold: float = 1e-6,
    step: float = 1e-4,
) -> FlatDirections:
    """Count the flat directions of ``fit_model`` at the base split of ``truth``, and those the loss sees.

    A flat direction changes ``f`` only at second order or not at all; one that moves the
    Voronoi loss is a direction along which data cannot pin the loss down at first order. A
    property of the class and the truth: no fit is involved.

    Parameters
    ----------
    fit_model, true_model, truth
        As in :func:`exact_representations` (the truth in ``true_model``'s structure; the loss
        is :func:`hmoe_sim.losses.voronoi_losses_for` against it, the sweep's scoring convention).
    kind : {"D1", "D2"}
        The loss.
    r : float, default 1
        Exponent of ``D2``.
    n_points : int, default 4000
        Inputs of :func:`hmoe_sim.losses.eval_sample` (seed 0, uniform) for the Jacobian.
    threshold : float, default 1e-6
        Relative singular-value threshold of a flat direction.
    step : float, default 1e-4
        Step along each unit flat direction at which the loss change is measured.

    Returns
    -------
    FlatDirections
    """
    _check_pair(fit_model, true_model, truth)
    check_choice("kind", kind, ("D1", "D2"))
    threshold = check_positive_float("threshold", threshold)
    step = check_positive_float("step", step)
    truth64 = true_model.cast(truth, device="cpu", dtype=torch.float64)
    split = _default_split(fit_model, _atoms_per_group(true_model))
    base = _from_grouped(fit_model, _build(fit_model, true_model, truth64, split))
    # at least as many inputs as parameters, so that every direction has a singular value
    X = eval_sample(fit_model.input_dim, max(check_positive_int("n_points", n_points), fit_model.n_params), 0)
    J = _jacobian(fit_model, base, X) / math.sqrt(X.shape[0])
    basis = gauge_directions(fit_model, base)
    comp = torch.linalg.svd(basis, full_matrices=True)[0][:, basis.shape[1]:] if basis.shape[1] else None
    _, s, vh = torch.linalg.svd(J @ comp if comp is not None else J, full_matrices=False)
    directions = vh[s < threshold * s[0]].T
    if comp is not None:
        directions = comp @ directions
    theta = fit_model.flatten(base)
    moved = torch.stack([theta + step * directions[:, j] for j in range(directions.shape[1])]) \
        if directions.shape[1] else theta.new_zeros(0, theta.shape[0])
    at_base = float(voronoi_losses_for(fit_model, base, true_model, truth64, kinds=(kind,), r=r)[kind])
    if moved.shape[0] == 0:
        return FlatDirections(0, 0)
    losses = voronoi_losses_for(fit_model, fit_model.unflatten(moved), true_model, truth64, kinds=(kind,), r=r)[kind]
    n_loss = int(((losses - at_base).abs() > LOSS_MOVE_TOL).sum())
    return FlatDirections(int(directions.shape[1]), n_loss)
