"""Exact representations of a truth and loss floors (pure math, no I/O).

A Voronoi loss measures the distance between mixing measures; a regression function can have
many exactly equal representations in an over-specified class. When a representation
reproduces ``f*`` exactly but has a positive loss, no amount of data drives that loss to zero
for an estimator that lands there: the loss has a *floor* on the model class. This module
lists the known exact reparametrisations (:func:`exact_representations`), takes the largest
loss over them (:func:`loss_floor`); local identifiability at the true size, by the singular
values of the Jacobian of ``f``, is :mod:`hmoe_sim.identifiability.spectra`.

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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hmoe_sim._validation import check_choice, check_positive_float
from hmoe_sim.losses import voronoi_losses_for
from hmoe_sim.models.base import MixtureModel, Params
from hmoe_sim.models.flat import FlatMoE
from hmoe_sim.models.hmoe import HMoE

__all__ = ["EXACT_TOL", "FLOOR_KINDS", "atoms_per_group", "base_representation", "exact_representations",
           "loss_floor", "representation_losses"]

#: loss kinds accepted by :func:`loss_floor` (``"L2"`` is a function of ``f``: its floor is 0)
FLOOR_KINDS = ("D1", "D2", "L2")
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
    if atoms_per_group(fit_model) < atoms_per_group(true_model):
        raise ValueError(f"fit_model has {atoms_per_group(fit_model)} atoms per group, fewer than the "
                         f"truth's {atoms_per_group(true_model)}")
    if len(true_model.batch_shape(truth)):
        raise ValueError(f"truth must be unbatched, got batch shape {tuple(true_model.batch_shape(truth))}")


def atoms_per_group(model: MixtureModel) -> int:
    """Atoms of one group: a head's adapters for an HMoE, every atom for a flat model.

    Parameters
    ----------
    model : MixtureModel

    Returns
    -------
    int
    """
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
    k_fit = atoms_per_group(fit_model)
    source = [i % k_true for i in range(k_fit)]
    tanh_sigmoid = _gate(fit_model) == "sigmoid" and _expert(fit_model) == "tanh"
    return _Split(source, [tanh_sigmoid and i >= k_true for i in range(k_fit)])


def _build(fit_model: MixtureModel, true_model: MixtureModel, truth: Params, split: _Split) -> Params:
    """The grouped base representation of ``split`` (exact by construction)."""
    grouped = _to_grouped(true_model, truth)
    k_true = atoms_per_group(true_model)
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


def base_representation(fit_model: MixtureModel, true_model: MixtureModel, truth: Params) -> Params:
    """The base split of ``truth`` in ``fit_model``'s class (unbatched float64, exact by construction).

    Atom ``i`` copies true atom ``i mod k*`` with the mass (softmax) or expert (sigmoid) shared
    among the copies, as described in this module's docstring.
    """
    _check_pair(fit_model, true_model, truth)
    truth64 = true_model.cast(truth, device="cpu", dtype=torch.float64)
    split = _default_split(fit_model, atoms_per_group(true_model))
    return _from_grouped(fit_model, _build(fit_model, true_model, truth64, split))


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
    k_true = atoms_per_group(true_model)
    k_fit = atoms_per_group(fit_model)
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
