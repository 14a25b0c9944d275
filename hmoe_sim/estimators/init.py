"""Initialisation protocols: near the truth (with atom splitting), random in the box, and the group's recipe.

Seeds are ``int`` or ``numpy.random.SeedSequence``; draws use NumPy's PCG64 in float64 on
the CPU, so a seed gives the same start on every device, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hmoe_sim._validation import check_choice, check_number, check_positive_float, check_positive_int, check_seed
from hmoe_sim.data import SeedLike, as_generator
from hmoe_sim.estimators.bounds import Bounds
from hmoe_sim.models.base import MixtureModel, Params
from hmoe_sim.models.flat import FlatMoE
from hmoe_sim.models.hmoe import HMoE

__all__ = ["PAPER_NOISE", "init_near_truth", "init_paper", "init_random", "split_atoms"]

# parameters indexed by atom, and the axis of the atom index (per model family)
_FLAT_ATOM_AXIS = {"beta0": 0, "beta1": 0, "a": 0, "b": 0}
_HMOE_ATOM_AXIS = {"beta0": 1, "beta1": 1, "a": 1, "b": 1, "z": 1}


def _batch(batch_shape: tuple[int, ...] | int) -> tuple[int, ...]:
    shape = (batch_shape,) if isinstance(batch_shape, int) else tuple(batch_shape)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
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

    Raises
    ------
    ValueError
        A NaN, infinite or negative ``perturbation``, a negative or non-integer ``seed``, or a
        bad ``batch_shape`` (each message names the argument and the value).
    """
    shape = _batch(batch_shape)
    perturbation = check_number("perturbation", perturbation, minimum=0.0)
    check_seed("seed", seed)
    base = fit_model.flatten(split_atoms(fit_model, true_model, truth))
    noise = as_generator(seed).standard_normal((*shape, fit_model.n_params))
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

    Raises
    ------
    ValueError
        A NaN, zero or negative ``scale``, a negative or non-integer ``seed``, a bad
        ``batch_shape``, or an infinite box (each message names the argument and the value).
    """
    shape = _batch(batch_shape)
    scale = check_number("scale", scale, minimum=0.0, strict=True, allow_inf=True)
    check_seed("seed", seed)
    lo, hi = (bounds or Bounds()).vectors(fit_model)
    lo, hi = lo.clamp_min(-scale), hi.clamp_max(scale)
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("init_random needs a finite box: give finite bounds or a finite scale")
    u = torch.from_numpy(as_generator(seed).random((*shape, fit_model.n_params)))
    params = fit_model.unflatten(lo + (hi - lo) * u)
    return fit_model.cast({k: v.contiguous() for k, v in params.items()}, device=device, dtype=dtype)


#: noise layouts of :func:`init_paper`
PAPER_NOISE = ("per_atom", "per_coordinate")
# per model family: the gating and the expert parameter names of an atom
_GATING, _EXPERT = ("beta0", "beta1"), ("a", "b")


def _surjective_assignments(rng: np.random.Generator, count: int, k_fit: int, k_true: int,
                            max_candidates: int = 10_000_000) -> np.ndarray:
    """``(count, k_fit)`` maps fitted atom -> true atom, each uniform among the maps that use every true atom.

    Rejection sampling: draw every fitted atom's true atom uniformly, redraw the whole map until
    every true atom is used (the recipe's loop, done in blocks of candidates).
    """
    out = np.empty((count, k_fit), dtype=np.int64)
    filled, drawn = 0, 0
    block = max(64, 4 * count)
    while filled < count:
        if drawn >= max_candidates:
            raise ValueError(f"no assignment of {k_fit} fitted atoms using all {k_true} true atoms after "
                             f"{max_candidates} draws; k_fit={k_fit} is too close to k_true={k_true} for "
                             "rejection sampling")
        candidates = rng.integers(0, k_true, size=(block, k_fit))
        drawn += block
        used = np.zeros((block, k_true), dtype=bool)
        np.put_along_axis(used, candidates, True, axis=1)
        good = candidates[used.all(axis=1)][: count - filled]
        out[filled : filled + len(good)] = good
        filled += len(good)
    return out


def init_paper(
    fit_model: MixtureModel,
    true_model: MixtureModel,
    truth: Params,
    n: int,
    *,
    batch_shape: tuple[int, ...] | int = (),
    seed: SeedLike = 0,
    noise: str = "per_atom",
    gate_scale: float = 0.005,
    expert_scale: float = 0.05,
    exponent: float = -0.083,
    bounds: Bounds | None = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Params:
    """The start of the group's public simulation code: the truth plus noise that shrinks with ``n``.

    Recipe (issue 10 item 3(c), as described there from the group's R code):

    * each fitted atom starts from a true atom chosen at random, and the whole choice is redrawn
      until every true atom is used (so with ``k = k* + 1`` the extra atom duplicates one); the
      copies keep the true atom's full parameters, masses included (unlike :func:`split_atoms`,
      the start does not keep ``f*`` exactly: a duplicated atom counts twice in the gate);
    * Gaussian noise with standard deviation ``gate_scale * n**exponent`` on the gating
      parameters ``(beta_0, beta_1)`` and ``expert_scale * n**exponent`` on the expert
      parameters ``(a, b)`` of every atom; ``noise="per_atom"`` draws one scalar per atom and
      parameter group and adds it to every coordinate of that atom's gating (resp. expert)
      vector, ``noise="per_coordinate"`` draws every coordinate independently;
    * softmax gating without known anchors: the last fitted atom's gating parameters start at
      ``0`` plus noise, the reference category of the group's code (this matches the truth when
      the truth's last gate is ``0``; shift the truth's gates first if it is not -- softmax is
      invariant to a common shift). With a known anchor expert (preset ``softmax-linear``), or in
      a non-shared HMoE (the frozen known experts), the known experts fix the reference: every
      fitted gate, the last included, starts from its true atom's gate plus noise. Sigmoid gating
      has no reference category and is treated the same way.

    Every start (batch element), and every head of an HMoE, draws its own assignment; the
    start is then clipped into ``bounds`` like :func:`init_near_truth`.

    Parameters
    ----------
    fit_model, true_model : FlatMoE or non-shared HMoE
        Fitted and true models of the same family (``k >= k*`` atoms, per head for an HMoE).
    truth : dict of torch.Tensor
        Unbatched true parameters of ``true_model``.
    n : int
        Sample size of the data set the start is for (the noise shrinks like ``n**exponent``).
    batch_shape : tuple of int or int
        Batch shape of the returned container (default: unbatched).
    seed : int, SeedSequence or Generator
        Source of the assignments and the noise.
    noise : {"per_atom", "per_coordinate"}
        Noise layout (above).
    gate_scale, expert_scale : float
        Noise standard deviations at ``n = 1`` (non-negative).
    exponent : float
        Power of ``n`` in the standard deviations (default ``-0.083``, the group's).
    bounds : Bounds, optional
        Starts are clipped into this box (default :class:`Bounds`).
    dtype, device
        Of the returned tensors (default float64 on the CPU).

    Returns
    -------
    dict of torch.Tensor
        Container of ``fit_model`` with the given batch shape.

    Raises
    ------
    ValueError
        Unknown ``noise``, a bad scale, exponent or ``n``, fewer fitted than true atoms, a shared
        HMoE (its atoms are generated from codes through a shared hypernetwork, so "the gating
        vector of an atom" is not a set of free parameters) or an HMoE with a softmax first level.
    """
    noise = check_choice("noise", noise, PAPER_NOISE)
    n = check_positive_int("n", n)
    gate_scale = check_positive_float("gate_scale", gate_scale, allow_zero=True)
    expert_scale = check_positive_float("expert_scale", expert_scale, allow_zero=True)
    exponent = check_number("exponent", exponent)
    check_seed("seed", seed)
    shape = _batch(batch_shape)
    if type(fit_model) is not type(true_model):
        raise TypeError(f"fit_model is {type(fit_model).__name__} but true_model is {type(true_model).__name__}")
    if isinstance(fit_model, HMoE):
        assert isinstance(true_model, HMoE)
        for model in (fit_model, true_model):
            if model.structure != "nonshared":
                raise ValueError(f"init_paper needs free atoms; got an HMoE with structure={model.structure!r} "
                                 "(shared atoms are generated from codes, they have no free gating vector)")
            if model.first_level != "uniform":
                raise ValueError(f"init_paper covers a uniform first level; got first_level={model.first_level!r}")
        reference_gate = False
    elif isinstance(fit_model, FlatMoE):
        assert isinstance(true_model, FlatMoE)
        reference_gate = fit_model.gate == "softmax" and fit_model.anchors is None
    else:
        raise TypeError(f"init_paper supports FlatMoE and HMoE, got {type(fit_model).__name__}")
    k_true, k_fit = _atoms_per_group(true_model), _atoms_per_group(fit_model)
    if k_fit < k_true:
        raise ValueError(f"fit_model has {k_fit} atoms per group, fewer than the truth's {k_true}")
    true_model.batch_shape(truth)
    # every parameter as (groups, k*, width): one group for a flat model, one per head for an HMoE
    groups = fit_model.n_heads if isinstance(fit_model, HMoE) else 1
    true = {name: truth[name].detach().to(dtype=torch.float64, device="cpu").numpy().reshape(groups, k_true, -1)
            for name in (*_GATING, *_EXPERT)}
    rng = as_generator(seed)
    count = math.prod(shape) * groups
    source = _surjective_assignments(rng, count, k_fit, k_true).reshape(*shape, groups, k_fit)
    sd = {name: (gate_scale if name in _GATING else expert_scale) * float(n) ** exponent for name in true}
    base = {name: np.take_along_axis(np.broadcast_to(value, (*shape, groups, k_true, value.shape[-1])),
                                     source[..., None], axis=-2).copy()
            for name, value in true.items()}
    if reference_gate:
        for name in _GATING:
            base[name][..., -1, :] = 0.0
    if noise == "per_atom":
        scalars = {part: rng.standard_normal((*shape, groups, k_fit, 1)) for part in ("gating", "expert")}
        draws = {name: np.broadcast_to(scalars["gating" if name in _GATING else "expert"], base[name].shape)
                 for name in base}
    else:
        draws = {name: rng.standard_normal(base[name].shape) for name in base}
    out: Params = {}
    param_shapes = fit_model.param_shapes()
    for name in param_shapes:
        value = base[name] + sd[name] * draws[name]
        out[name] = torch.from_numpy(np.ascontiguousarray(value)).reshape(*shape, *param_shapes[name])
    params = (bounds or Bounds()).project(fit_model, out)
    return fit_model.cast({k: v.contiguous() for k, v in params.items()}, device=device, dtype=dtype)
