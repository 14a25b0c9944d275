"""Losses between mixing measures (Voronoi losses) and between regression functions (L2).

Voronoi cells [Sigmoid eq. 5; NoRGa eqs. 17, 18, 23; theory.md section 3]: fitted atom ``i``
belongs to the cell ``V_j`` of the true atom ``omega*_j`` nearest to it in Euclidean distance.
**Tie rule:** an atom at equal distance from several true atoms goes to the one with the
lowest index (``argmin`` returns the first minimiser, in numpy and in torch alike). With
``groups`` (a two-level model, one group per head), an atom is only compared with the true
atoms of its own group: cells are formed level by level.

Atom differences are measured block by block: an atom ``omega = (beta_1, a, b)`` in
``R^{2D+1}`` has blocks of sizes ``(D, D, 1)``; ``blocks=None`` treats the whole atom as one
block. With ``Delta_ij = omega_i - omega*_j`` split into blocks ``Delta^{(1)}, ...``:

.. math::

    D_1(G, G^*) &= \\sum_{j: |V_j| > 1} \\sum_{i \\in V_j} w_i \\sum_c \\|\\Delta^{(c)}_{ij}\\|^2
                 + \\sum_{j: |V_j| = 1} \\sum_{i \\in V_j} w_i \\sum_c \\|\\Delta^{(c)}_{ij}\\|
                 + \\sum_j \\Big|\\sum_{i \\in V_j} w_i - w^*_j\\Big| \\\\
    D_{2,r}(G, G^*) &= \\sum_j \\sum_{i \\in V_j} w_i \\sum_c \\|\\Delta^{(c)}_{ij}\\|^r
                 + \\sum_j \\Big|\\sum_{i \\in V_j} w_i - w^*_j\\Big|

with ``w_i = exp(beta_0i)``. ``D1`` ignores ``r`` (its exponents are fixed: 1 in singleton
cells, 2 in multi-atom cells). An empty cell contributes its full true mass ``w*_j``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hmoe_sim._validation import check_choice, check_finite_tensor, check_positive_float, check_positive_int
from hmoe_sim.data import X_DISTRIBUTIONS, draw_inputs
from hmoe_sim.estimators.bounds import Bounds
from hmoe_sim.models.base import MixtureModel, Params

__all__ = [
    "ATOM_PARAMETERS",
    "LOSS_KINDS",
    "atoms_at_box",
    "d1_sources",
    "d1_sources_for",
    "voronoi_loss",
    "voronoi_losses_for",
    "atom_blocks",
    "eval_sample",
    "l2_error",
]

LOSS_KINDS = ("D1", "D2")
#: parameter names that belong to one atom each (their leading entries run over the atoms in
#: ``mixing_measure`` order): the gate intercept, gate slope and expert, and a shared HMoE's code
ATOM_PARAMETERS = ("beta0", "beta1", "a", "b", "z")


def _as_tensor(name: str, value: Any, *, like: torch.Tensor | None = None) -> torch.Tensor:
    """A floating torch tensor from a numpy array / tensor / sequence (float64 by default)."""
    if isinstance(value, torch.Tensor):
        t = value if value.is_floating_point() else value.to(torch.float64)
    else:
        arr = np.asarray(value)
        if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
        t = torch.as_tensor(arr.astype(np.float64))
    if like is not None:
        t = t.to(device=like.device, dtype=like.dtype)
    if t.device.type == "meta":
        raise ValueError(f"{name} is on device {t.device} (a tensor without data)")
    if torch.isnan(t).any():
        raise ValueError(f"{name} contains NaN (first at index {tuple(torch.nonzero(torch.isnan(t))[0].tolist())})")
    return check_finite_tensor(name, t)


def _check_blocks(blocks: Sequence[int] | None, p: int) -> tuple[int, ...]:
    if blocks is None:
        return (p,)
    out = tuple(check_positive_int("blocks entry", b) for b in blocks)
    if sum(out) != p:
        raise ValueError(f"blocks {out} sum to {sum(out)} but atoms have p={p} coordinates")
    return out


def _check_groups(groups: Any, true_groups: Any, k: int, k_true: int, device: torch.device
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if (groups is None) != (true_groups is None):
        raise ValueError("groups and true_groups must be given together (both or neither)")
    if groups is None:
        return None, None
    g = torch.as_tensor(np.asarray(groups) if not isinstance(groups, torch.Tensor) else groups).to(device)
    tg = torch.as_tensor(np.asarray(true_groups) if not isinstance(true_groups, torch.Tensor)
                         else true_groups).to(device)
    if g.dim() != 1 or g.shape[0] != k:
        raise ValueError(f"groups has shape {tuple(g.shape)}; expected ({k},), one group per fitted atom")
    if tg.dim() != 1 or tg.shape[0] != k_true:
        raise ValueError(f"true_groups has shape {tuple(tg.shape)}; expected ({k_true},), one per true atom")
    if g.is_floating_point() or tg.is_floating_point():
        raise TypeError("groups and true_groups must be integer labels")
    orphan = sorted(set(g.tolist()) - set(tg.tolist()))
    if orphan:
        raise ValueError(f"fitted atoms in group(s) {orphan} have no true atom of the same group")
    return g, tg


def voronoi_loss(
    weights: Any,
    atoms: Any,
    true_weights: Any,
    true_atoms: Any,
    *,
    kind: str = "D1",
    r: float = 1,
    groups: Any = None,
    true_groups: Any = None,
    blocks: Sequence[int] | None = None,
    return_breakdown: bool = False,
) -> Any:
    """Voronoi loss ``D1`` or ``D2r`` between a (batch of) fitted measure(s) and the truth.

    Parameters
    ----------
    weights : array or tensor
        ``(*batch, k)`` fitted masses ``exp(beta_0i)`` (non-negative).
    atoms : array or tensor
        ``(*batch, k, p)`` fitted atom locations.
    true_weights : array or tensor
        ``(k*,)`` true masses.
    true_atoms : array or tensor
        ``(k*, p)`` true atom locations.
    kind : {"D1", "D2"}
        Loss (module docstring). ``D1`` ignores ``r``.
    r : float, default 1
        Exponent of ``D2`` (``>= 1``).
    groups, true_groups : array or tensor of int, optional
        ``(k,)`` and ``(k*,)`` group (head) labels: two-level cells. Give both or neither.
    blocks : sequence of int, optional
        Block sizes splitting the ``p`` coordinates (e.g. ``(D, D, 1)``); default one block.
    return_breakdown : bool, default False
        Also return the per-cell terms.

    Returns
    -------
    loss : ndarray or tensor
        ``(*batch,)``; numpy in (``weights`` a numpy array) gives numpy out (float64),
        torch in gives torch out on the input's device and dtype.
    breakdown : dict, only with ``return_breakdown=True``
        ``cell_size (*batch, k*)``, ``mass_error (*batch, k*)`` (signed:
        ``sum_{i in V_j} w_i - w*_j``), ``location (*batch, k*)`` (the weighted location
        terms of cell ``j``), ``assignment (*batch, k)`` (the cell of each fitted atom) and
        ``atom_location (*batch, k)`` (the weighted location term of each fitted atom; its sum
        over the atoms of cell ``j`` is ``location[..., j]``).

    Raises
    ------
    ValueError
        Mismatched ``p`` or ``k``, negative weights, NaN or infinite entries, ``r < 1``,
        unknown ``kind``, bad groups or blocks.
    """
    kind = check_choice("kind", kind, LOSS_KINDS)
    r = check_positive_float("r", r)
    if r < 1:
        raise ValueError(f"r must be >= 1, got {r!r}")
    numpy_out = not isinstance(weights, torch.Tensor)
    w = _as_tensor("weights", weights)
    om = _as_tensor("atoms", atoms, like=w)
    tw = _as_tensor("true_weights", true_weights, like=w)
    tom = _as_tensor("true_atoms", true_atoms, like=w)
    if w.dim() < 1:
        raise ValueError(f"weights has shape {tuple(w.shape)}; expected (*batch, k)")
    if om.dim() != w.dim() + 1 or om.shape[:-1] != w.shape:
        raise ValueError(f"atoms has shape {tuple(om.shape)}; expected (*batch, k, p) with (*batch, k) = "
                         f"{tuple(w.shape)} from weights")
    if tw.dim() != 1 or tom.dim() != 2 or tom.shape[0] != tw.shape[0]:
        raise ValueError(f"true_weights {tuple(tw.shape)} and true_atoms {tuple(tom.shape)} must be (k*,) and (k*, p)")
    if tom.shape[1] != om.shape[-1]:
        raise ValueError(f"atoms have p={om.shape[-1]} coordinates but true_atoms have p={tom.shape[1]}")
    for name, t in (("weights", w), ("true_weights", tw)):
        if (t < 0).any():
            raise ValueError(f"{name} must be non-negative, got minimum {t.min().item()!r}")
    k, k_true, p = om.shape[-2], tom.shape[0], om.shape[-1]
    sizes = _check_blocks(blocks, p)
    g, tg = _check_groups(groups, true_groups, k, k_true, w.device)

    diff = om.unsqueeze(-2) - tom  # (*batch, k, k*, p)
    dist2 = (diff * diff).sum(-1)
    if g is not None:
        assert tg is not None
        dist2 = dist2.masked_fill(g[:, None] != tg[None, :], math.inf)
    assign = torch.argmin(dist2, dim=-1)  # first minimiser: lowest true index wins ties
    onehot = torch.nn.functional.one_hot(assign, k_true).to(w.dtype)  # (*batch, k, k*)
    delta = torch.gather(diff, -2, assign[..., None, None].expand(*assign.shape, 1, p)).squeeze(-2)
    block_norms = torch.stack([torch.linalg.vector_norm(part, dim=-1) for part in delta.split(sizes, dim=-1)], -1)

    cell_size = onehot.sum(-2)
    mass_error = (onehot * w.unsqueeze(-1)).sum(-2) - tw
    if kind == "D2":
        per_atom = w * (block_norms**r).sum(-1)
    else:
        multi = torch.gather(cell_size, -1, assign) > 1  # (*batch, k)
        per_atom = w * torch.where(multi, (block_norms**2).sum(-1), block_norms.sum(-1))
    location = (onehot * per_atom.unsqueeze(-1)).sum(-2)
    loss = location.sum(-1) + mass_error.abs().sum(-1)
    if numpy_out:
        loss = loss.numpy()
    if not return_breakdown:
        return loss
    breakdown = {"cell_size": cell_size, "mass_error": mass_error, "location": location, "assignment": assign,
                 "atom_location": per_atom}
    if numpy_out:
        breakdown = {key: v.numpy() for key, v in breakdown.items()}
    return loss, breakdown


def d1_sources(
    weights: Any,
    atoms: Any,
    true_weights: Any,
    true_atoms: Any,
    at_box: Any,
    *,
    groups: Any = None,
    true_groups: Any = None,
    blocks: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Where ``D1`` comes from: its mass, location and box terms, which add up to it.

    ``D1 = mass + location + box`` (module docstring): ``mass`` is the sum over true atoms of
    the cell mass errors ``|sum_{i in V_j} w_i - w*_j|`` (an empty cell: its whole true mass);
    ``box`` is the sum of the weighted location terms of the fitted atoms flagged in ``at_box``
    (atoms whose own parameters end at the box, :func:`atoms_at_box`); ``location`` the weighted
    location terms of every other fitted atom. Each atom keeps the exponent its cell gives it
    (squared distances in a multi-atom cell), so the split is exact. The mass term is a
    property of a cell, not of an atom, and is not split by the box.

    Parameters
    ----------
    weights, atoms, true_weights, true_atoms, groups, true_groups, blocks
        As for :func:`voronoi_loss`.
    at_box : array or tensor of bool
        ``(*batch, k)``: fitted atoms at the box.

    Returns
    -------
    dict
        ``{"D1", "mass", "location", "box"}``, each ``(*batch,)``; numpy in gives numpy out
        (float64), torch in gives torch out, as :func:`voronoi_loss`.

    Raises
    ------
    ValueError
        ``at_box`` does not have the shape of ``weights``, or any error of :func:`voronoi_loss`.
    """
    loss, parts = voronoi_loss(weights, atoms, true_weights, true_atoms, kind="D1", groups=groups,
                               true_groups=true_groups, blocks=blocks, return_breakdown=True)
    numpy_out = not isinstance(weights, torch.Tensor)
    per_atom = torch.as_tensor(parts["atom_location"])
    box_mask = torch.as_tensor(np.asarray(at_box) if not isinstance(at_box, torch.Tensor) else at_box)
    if box_mask.shape != per_atom.shape:
        raise ValueError(f"at_box has shape {tuple(box_mask.shape)}; expected {tuple(per_atom.shape)}, one flag per "
                         "fitted atom")
    if box_mask.dtype != torch.bool:
        raise TypeError(f"at_box must be boolean, got dtype {box_mask.dtype}")
    box_mask = box_mask.to(per_atom.device)
    box = torch.where(box_mask, per_atom, torch.zeros_like(per_atom)).sum(-1)
    out = {"D1": torch.as_tensor(loss), "mass": torch.as_tensor(parts["mass_error"]).abs().sum(-1),
           "location": torch.where(box_mask, torch.zeros_like(per_atom), per_atom).sum(-1), "box": box}
    return {k: v.numpy() for k, v in out.items()} if numpy_out else out


def atoms_at_box(model: MixtureModel, params: Params, bounds: Bounds) -> torch.Tensor:
    """``(*batch, k)`` bool: fitted atoms one of whose own parameters ends at the box.

    An atom's own parameters are the entries of :data:`ATOM_PARAMETERS` (``beta0, beta1, a, b``
    and a shared HMoE's code ``z``) at its index, in the order of ``model.mixing_measure``; an
    entry is at the box as :meth:`~hmoe_sim.estimators.Bounds.at_bounds` says (within
    ``boundary_tol`` of a finite bound). Parameters that every atom shares (a shared HMoE's
    ``W1, W2, w3``, the head gate) belong to no atom: at the box they move every atom and are
    reported by the fit's ``boundary_params``, not here.
    """
    batch = model.batch_shape(params, check_finite=False)
    k = model.n_atoms
    hit = torch.zeros(*batch, k, dtype=torch.bool, device=next(iter(params.values())).device)
    for name, shape in model.param_shapes().items():
        if name not in ATOM_PARAMETERS:
            continue
        value = params[name].reshape(*batch, math.prod(shape))
        low, high = bounds.limits_for(name)
        lo = torch.full_like(value, low)
        hi = torch.full_like(value, high)
        at_lo, at_hi = bounds.at_bounds(value, lo, hi)
        per_atom = math.prod(shape) // k
        hit |= (at_lo | at_hi).reshape(*batch, k, per_atom).any(-1)
    return hit


def d1_sources_for(model: MixtureModel, params: Params, true_model: MixtureModel, truth: Params,
                   bounds: Bounds) -> dict[str, torch.Tensor]:
    """:func:`d1_sources` of fitted parameters against the truth, batched over ``params``.

    The measures and cells are those of :func:`voronoi_losses_for`; the atoms at the box are
    :func:`atoms_at_box` under ``bounds`` (the fit's box).
    """
    mm = model.mixing_measure(params)
    like = mm.weights
    tm = true_model.mixing_measure(true_model.cast(truth, device=like.device, dtype=like.dtype))
    return d1_sources(mm.weights, mm.atoms, tm.weights, tm.atoms, atoms_at_box(model, params, bounds),
                      groups=mm.groups, true_groups=tm.groups, blocks=atom_blocks(model))


def atom_blocks(model: MixtureModel) -> tuple[int, int, int]:
    """Block sizes ``(D, D, 1)`` of the atoms ``(beta_1, a, b)`` of the models of hmoe-sim."""
    d = model.input_dim
    return (d, d, 1)


def voronoi_losses_for(
    model: MixtureModel,
    params: Params,
    true_model: MixtureModel,
    truth: Params,
    *,
    kinds: Sequence[str] = ("D1", "D2"),
    r: float = 1,
) -> dict[str, torch.Tensor]:
    """Voronoi losses of fitted parameters against the truth, batched over ``params``.

    The mixing measures come from ``model.mixing_measure`` (for a shared HMoE these are the
    atoms generated by the hypernetwork) and cells are two-level when the model has groups.
    Atom differences are measured in the blocks ``(beta_1, a, b)`` (:func:`atom_blocks`).

    Returns
    -------
    dict of torch.Tensor
        ``{kind: loss (*batch,)}`` on the device and in the dtype of ``params``.
    """
    mm = model.mixing_measure(params)
    like = mm.weights
    tm = true_model.mixing_measure(true_model.cast(truth, device=like.device, dtype=like.dtype))
    if tm.weights.dim() != 1:
        raise ValueError(f"truth must be unbatched, got weights of shape {tuple(tm.weights.shape)}")
    return {kind: voronoi_loss(mm.weights, mm.atoms, tm.weights, tm.atoms, kind=kind, r=r, groups=mm.groups,
                               true_groups=tm.groups, blocks=atom_blocks(model)) for kind in kinds}


def eval_sample(input_dim: int, n_eval: int = 10_000, seed: int = 0, x_dist: str = "uniform") -> torch.Tensor:
    """The fixed evaluation sample of :func:`l2_error`: ``(n_eval, input_dim)`` float64 on the CPU.

    A pure function of ``(input_dim, n_eval, seed, x_dist)``:
    ``numpy.random.default_rng(seed)`` draws ``Uniform([-1, 1]^D)`` or ``N(0, I_D)`` rows.
    """
    d = check_positive_int("input_dim", input_dim)
    n = check_positive_int("n_eval", n_eval)
    check_choice("x_dist", x_dist, X_DISTRIBUTIONS)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return torch.from_numpy(draw_inputs(np.random.default_rng(int(seed)), n, d, x_dist))


def l2_error(
    model: MixtureModel,
    params: Params,
    truth: Params,
    *,
    true_model: MixtureModel | None = None,
    n_eval: int = 10_000,
    seed: int = 0,
    x_dist: str = "uniform",
    max_elements: int = 2**24,
) -> torch.Tensor:
    """Monte Carlo ``||f_G - f_{G*}||_{L2(mu)}`` on a fixed evaluation sample, batched over fits.

    Parameters
    ----------
    model : MixtureModel
        Fitted model; ``params`` has any batch shape.
    params : dict of torch.Tensor
        Fitted parameters, on any device and dtype.
    truth : dict of torch.Tensor
        Unbatched true parameters of ``true_model``.
    true_model : MixtureModel, optional
        Defaults to ``model.with_atoms(truth["beta0"].shape[-1])``.
    n_eval, seed, x_dist
        The evaluation sample, :func:`eval_sample` ``(model.input_dim, n_eval, seed, x_dist)``:
        results are reproducible from these three numbers.
    max_elements : int
        Bound on ``batch_chunk * n_eval * n_atoms`` per chunk (memory control).

    Returns
    -------
    torch.Tensor
        ``(*batch,)`` root mean square of ``f_G(X) - f_{G*}(X)`` over the sample, in the dtype
        and on the device of ``params``. ``f_{G*}`` is computed in float64.
    """
    for key, value in truth.items():
        check_finite_tensor(f"truth[{key!r}]", value.detach())
    if true_model is None:
        true_model = model.with_atoms(int(truth["beta0"].shape[-1]))
    batch = model.batch_shape(params)
    like = next(iter(params.values()))
    X64 = eval_sample(model.input_dim, n_eval, seed, x_dist)
    f_true = true_model.predict(true_model.cast(truth, device="cpu", dtype=torch.float64), X64)
    f_true = f_true.to(device=like.device)
    X = X64.to(device=like.device, dtype=like.dtype)
    flat = {key: v.reshape(-1, *v.shape[len(batch):]) for key, v in params.items()}
    n_fits = math.prod(batch)
    per_fit = n_eval * max(1, model.n_atoms + 1)
    chunk = max(1, check_positive_int("max_elements", max_elements) // per_fit)
    out = []
    for start in range(0, n_fits, chunk):
        part = {key: v[start:start + chunk] for key, v in flat.items()}
        f = model.predict(part, X, check=False).to(torch.float64)
        out.append(torch.sqrt(((f - f_true) ** 2).mean(-1)))
    return torch.cat(out).reshape(batch).to(like.dtype)
