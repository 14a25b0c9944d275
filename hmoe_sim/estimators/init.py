"""Initialisation protocols: near the truth (with atom splitting) and random in the box.

Seeds are ``int`` or ``numpy.random.SeedSequence``; draws use NumPy's PCG64 in float64 on
the CPU, so a seed gives the same start on every device, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hmoe_sim.data import SeedLike
from hmoe_sim.data import _generator as _rng
from hmoe_sim.estimators.bounds import Bounds
from hmoe_sim.models.base import MixtureModel, Params
from hmoe_sim.models.flat import FlatMoE
from hmoe_sim.models.hmoe import HMoE

__all__ = ["init_near_truth", "init_random", "split_atoms"]

# parameters indexed by atom, and the axis of the atom index (per model family)
_FLAT_ATOM_AXIS = {"beta0": 0, "beta1": 0, "a": 0, "b": 0}
_HMOE_ATOM_AXIS = {"beta0": 1, "beta1": 1, "a": 1, "b": 1, "z": 1}


def _batch(batch_shape: tuple[int, ...] | int) -> tuple[int, ...]:
    shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
    if any(not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"batch_shape must hold positive integers, got {batch_shape!r}")
    return shape


def split_atoms(fit_model: MixtureModel, true_model: MixtureModel, truth: Params) -> Params:
    """An unbatched start for ``fit_model`` with the same regression function as ``truth``.

    The ``k`` fitted atoms (per head for an HMoE) are the ``k*`` true atoms followed by
    copies of true atoms ``0, 1, ...`` in turn; a true atom used ``m`` times gives each copy
    the mass ``exp(beta_0) / m`` (``beta_0 - log m``). With softmax gating this keeps the
    function exactly (the numerators add up). With sigmoid gating the gates do not add up,
    so the copies keep the gate and split the expert instead (``a / m``, ``b / m``): exact
    for identity and ReLU experts, approximate for tanh. Shared HMoE: the codes ``z`` are
    copied, the hypernetwork ``W`` is kept.
    """
    if type(fit_model) is not type(true_model):
        raise TypeError(f"fit_model is {type(fit_model).__name__} but true_model is {type(true_model).__name__}")
    k_true, k_fit = _atoms_per_group(true_model), _atoms_per_group(fit_model)
    if k_fit < k_true:
        raise ValueError(f"fit_model has {k_fit} atoms per group, fewer than the truth's {k_true}")
    true_model.batch_shape(truth)
    if isinstance(fit_model, HMoE):
        assert isinstance(true_model, HMoE)
        if fit_model.structure != true_model.structure:
            raise ValueError(f"structures differ: fit {fit_model.structure!r}, truth {true_model.structure!r}")
        axes = _HMOE_ATOM_AXIS
    else:
        axes = _FLAT_ATOM_AXIS
    source = [i % k_true for i in range(k_fit)]
    copies = np.bincount(source, minlength=k_true)[source].astype(np.float64)
    index = torch.as_tensor(source)
    out: Params = {}
    for name, value in truth.items():
        value = value.detach().to(dtype=torch.float64, device="cpu")
        out[name] = value.index_select(axes[name], index) if name in axes else value.clone()
    shape = [1] * out["beta0"].dim()
    shape[axes["beta0"]] = k_fit
    log_m = torch.as_tensor(np.log(copies)).reshape(shape)
    if isinstance(fit_model, FlatMoE) and fit_model.gate == "sigmoid":
        out["a"] = out["a"] / log_m.exp().unsqueeze(-1)
        out["b"] = out["b"] / log_m.exp()
    else:
        out["beta0"] = out["beta0"] - log_m
    fit_model.batch_shape(out)
    return out


def _atoms_per_group(model: MixtureModel) -> int:
    return model.n_adapters if isinstance(model, HMoE) else model.n_atoms


def init_near_truth(
    fit_model: MixtureModel,
    true_model: MixtureModel,
    truth: Params,
    *,
    batch_shape: tuple[int, ...] | int,
    perturbation: float = 0.1,
    seed: SeedLike = 0,
    bounds: Bounds | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Params:
    """Starts near the truth: :func:`split_atoms` plus i.i.d. ``N(0, perturbation^2)`` noise.

    Parameters
    ----------
    fit_model, true_model : MixtureModel
        Over-specified fitted model and the true model (same family and structure).
    truth : dict of torch.Tensor
        Unbatched true parameters of ``true_model``.
    batch_shape : tuple of int or int
        Batch shape of the returned container (e.g. ``(B,)`` or ``(B, m)``).
    perturbation : float
        Standard deviation of the noise added to every coordinate (``0``: the split truth).
    seed : int or SeedSequence
        Source of the noise.
    bounds : Bounds, optional
        Starts are clipped into this box (default :class:`Bounds`).

    Returns
    -------
    dict of torch.Tensor
        Container of ``fit_model`` with the given batch shape.
    """
    shape = _batch(batch_shape)
    if not (isinstance(perturbation, int | float) and math.isfinite(perturbation) and perturbation >= 0):
        raise ValueError(f"perturbation must be a finite non-negative number, got {perturbation!r}")
    base = fit_model.flatten(split_atoms(fit_model, true_model, truth))
    noise = _rng(seed).standard_normal((*shape, fit_model.n_params))
    theta = base + perturbation * torch.from_numpy(noise)
    params = (bounds or Bounds()).project(fit_model, fit_model.unflatten(theta))
    return fit_model.cast({k: v.contiguous() for k, v in params.items()}, device=device, dtype=dtype)


def init_random(
    fit_model: MixtureModel,
    *,
    batch_shape: tuple[int, ...] | int,
    bounds: Bounds | None = None,
    seed: SeedLike = 0,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Params:
    """Random starts: each coordinate uniform on ``[max(lo, -scale), min(hi, scale)]``.

    The box of the theory (default ``[-10, 10]``) is far wider than the parameters of the
    simulated truths (scale ``1/sqrt(D)``), so starts are drawn from its intersection with
    ``[-scale, scale]`` (default ``scale = 1``); pass ``scale=math.inf`` to draw from the
    whole (finite) box.
    """
    shape = _batch(batch_shape)
    if not (isinstance(scale, int | float) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    lo, hi = (bounds or Bounds()).vectors(fit_model)
    lo, hi = lo.clamp_min(-scale), hi.clamp_max(scale)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("init_random needs a finite box: give finite bounds or a finite scale")
    u = torch.from_numpy(_rng(seed).random((*shape, fit_model.n_params)))
    params = fit_model.unflatten(lo + (hi - lo) * u)
    return fit_model.cast({k: v.contiguous() for k, v in params.items()}, device=device, dtype=dtype)
