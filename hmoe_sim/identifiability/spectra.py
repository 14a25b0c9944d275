"""Local identifiability at the true size: singular values of the Jacobian of ``f`` (pure math).

:func:`jacobian_spectrum` gives the singular values of ``J / sqrt(n)`` with the known gauge
directions (:func:`gauge_directions`) removed or kept; :func:`nonidentifiable_reason` says why
a preset is not identifiable at its true size (a structural case, or near-zero singular values
and the coordinates they load on), or ``None``. :func:`gate_logit_spread` measures how much a
flat model's gate logits vary over the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hmoe_sim._validation import check_choice, check_positive_float, check_positive_int
from hmoe_sim.losses import eval_sample
from hmoe_sim.models.base import MixtureModel, Params
from hmoe_sim.models.flat import FlatMoE
from hmoe_sim.models.hmoe import HMoE
from hmoe_sim.models.presets import make_preset

__all__ = ["GAUGE_MODES", "JacobianSpectrum", "gate_logit_spread", "gauge_directions", "jacobian_spectrum",
           "nonidentifiable_reason", "parameter_names"]

#: ``"remove"``: spectrum on the complement of the gauge directions; ``"keep"``: of the full Jacobian
GAUGE_MODES = ("remove", "keep")


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
def flat_basis(model: MixtureModel, params: Params, X: torch.Tensor, threshold: float) -> torch.Tensor:
    """Orthonormal flat directions ``(n_params, m)`` of ``J / sqrt(n)`` at ``params``, gauge removed.

    The right singular vectors (mapped back to the full parameter coordinates) whose singular
    value is below ``threshold`` x the largest, on the complement of :func:`gauge_directions`.
    ``X`` needs at least as many rows as the model has free scalars.
    """
    if X.shape[0] < model.n_params:
        raise ValueError(f"flat_basis needs at least n_params = {model.n_params} inputs, got {X.shape[0]}")
    p64 = model.cast(params, device="cpu", dtype=torch.float64)
    J = _jacobian(model, p64, X) / math.sqrt(X.shape[0])
    basis = gauge_directions(model, p64)
    comp = torch.linalg.svd(basis, full_matrices=True)[0][:, basis.shape[1]:] if basis.shape[1] else None
    _, s, vh = torch.linalg.svd(J @ comp if comp is not None else J, full_matrices=False)
    v = vh[s < threshold * s[0]].T
    return comp @ v if comp is not None else v


def _zero_directions(model: MixtureModel, params: Params, X: torch.Tensor, threshold: float) -> tuple[int, list[str]]:
    """Number of singular values below ``threshold`` x largest (gauge removed) and the coordinates
    that carry most of their right singular vectors."""
    v = flat_basis(model, params, X, threshold)
    if not v.shape[1]:
        return 0, []
    energy = (v**2).sum(-1)
    order = torch.argsort(energy, descending=True)
    names = parameter_names(model)
    top = [names[int(i)] for i in order[:8] if energy[int(i)] > 0.05 * energy[order[0]]]
    return int(v.shape[1]), top


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
