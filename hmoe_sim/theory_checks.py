"""Fit-free numerical check of the mechanism behind the minimax lower bound.

[NoRGa Lemma A.2] (theory.md section 4): if along some sequence ``G_eps -> G*``

.. math::  \\rho(\\epsilon) = \\|f_{G_\\epsilon} - f_{G^*}\\|_{L^2(\\mu)} / D(G_\\epsilon, G^*) \\to 0,

no estimator can make ``D(G_n, G*)`` converge faster than ``||f_{G_n} - f_{G*}||`` allows:
the loss ``D`` is then too fine to be estimated at the function's rate. The *bad sequence*
splits one true atom ``j`` into two atoms with masses ``w*_j / 2 + eps^{r+1} / 2`` each and

* free atoms (flat MoE, non-shared HMoE): biases ``b*_j +- eps``, everything else unchanged;
* shared HMoE: codes ``z*_j +- eps d`` (unit ``d``); the hypernetwork generates the two
  atoms ``(s(W_1 z), s(W_2 z), s(w_3^T z))``; generated atoms are never moved directly.

In an HMoE atom ``l = atom`` is split in *every* head, so that ``G_eps`` is an ordinary
parameter set of the model with ``L + 1`` atoms per head.

Numerics. At ``eps = 1e-6`` the change of ``f`` is of order ``eps^2 = 1e-12`` (or
``eps^3``) against values of order one: forming ``f_{G_eps}(X) - f_{G*}(X)`` by subtracting
two predictions loses everything below about ``1e-16`` absolute. :func:`split_response`
forms the difference term by term instead:

.. math::

    g_\\epsilon - g^* = \\frac{\\Delta N - g^* \\Delta T}{T_\\epsilon},\\quad
    \\frac{\\Delta T}{e^{\\ell^*_j}} = \\sum_i \\rho_i\\,\\mathrm{expm1}(t_i) + \\sigma,\\quad
    \\frac{\\Delta N - g^*\\Delta T}{e^{\\ell^*_j}} = \\sum_i \\rho_i e^{t_i} \\Delta h_i
        + (h^*_j - g^*) \\frac{\\Delta T}{e^{\\ell^*_j}},

where ``rho_i = w_i / w*_j``, ``sigma = sum_i rho_i - 1 = eps^{r+1} / w*_j`` (given exactly,
never formed as a difference), ``t_i = delta beta_1i^T x`` and ``Delta h_i`` the change of the
expert output, computed with an exact identity for each activation
(:func:`activation_difference`). Only differences of size ``eps`` are rounded, so the
result keeps a relative accuracy of about ``1e-16 / eps``. The losses ``D`` are computed from
the same exact parameter deltas (the cells are known: both split atoms lie in the cell of
``omega*_j``; the tests compare with :func:`hmoe_sim.losses.voronoi_losses_for`).

The naive difference of two predictions is reported alongside (column ``l2_naive``) to show
where round-off would floor the curve.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from hmoe_sim._validation import check_choice, check_nonnegative_int, check_positive_float
from hmoe_sim.losses import LOSS_KINDS, eval_sample
from hmoe_sim.models.base import MixtureModel, Params
from hmoe_sim.models.flat import FlatMoE
from hmoe_sim.models.hmoe import HMoE
from hmoe_sim.models.presets import make_preset

__all__ = [
    "DEFAULT_EPS",
    "STANDARD_MODELS",
    "activation_difference",
    "split_response",
    "split_params",
    "split_terms",
    "split_loss",
    "inverse_bound_curve",
    "inverse_bound_table",
]

#: log grid from 1e-1 to 1e-7, four points per decade
DEFAULT_EPS = np.logspace(-1, -7, 25)


def activation_difference(activation: str, u: torch.Tensor, du: torch.Tensor) -> torch.Tensor:
    """``phi(u + du) - phi(u)`` without cancellation.

    identity: ``du``; tanh: ``tanh(du) (1 - tanh(u) tanh(u + du))`` (from
    ``tanh a - tanh b = tanh(a - b)(1 - tanh a tanh b)``); relu: ``du`` where ``u`` and
    ``u + du`` are both non-negative, ``0`` where both are non-positive, the direct
    difference only where the kink is crossed (there it is at most ``|du|``).
    """
    check_choice("activation", activation, ("identity", "tanh", "relu"))
    if activation == "identity":
        return du.expand(torch.broadcast_shapes(u.shape, du.shape)).clone()
    v = u + du
    if activation == "tanh":
        return torch.tanh(du) * (1 - torch.tanh(u) * torch.tanh(v))
    crossing = torch.relu(v) - torch.relu(u)
    return torch.where((u >= 0) & (v >= 0), du, torch.where((u <= 0) & (v <= 0), torch.zeros_like(crossing),
                                                            crossing))


def split_response(
    logits: torch.Tensor,
    experts: torch.Tensor,
    j: int,
    rho: torch.Tensor,
    sigma: float,
    t: torch.Tensor,
    dh: torch.Tensor,
) -> torch.Tensor:
    """``g_{G_eps}(x) - g_{G*}(x)`` of one softmax mixture when atom ``j`` is split.

    Parameters
    ----------
    logits, experts : torch.Tensor
        ``(n, K)`` gating scores and expert outputs of all atoms (known ones included) at the truth.
    j : int
        Column of the split atom.
    rho : torch.Tensor
        ``(m,)`` masses of the ``m`` replacing atoms relative to ``w*_j``.
    sigma : float
        ``sum(rho) - 1``, given exactly.
    t : torch.Tensor
        ``(n, m)`` changes of the gating scores ``delta beta_1i^T x`` (mass changes are in ``rho``).
    dh : torch.Tensor
        ``(n, m)`` changes of the expert outputs.

    Returns
    -------
    torch.Tensor
        ``(n,)`` (module docstring for the formula).
    """
    log_norm = torch.logsumexp(logits, dim=-1)
    g_star = (torch.softmax(logits, dim=-1) * experts).sum(-1)
    d_t = (rho * torch.expm1(t)).sum(-1) + sigma
    numer = (rho * torch.exp(t) * dh).sum(-1) + (experts[:, j] - g_star) * d_t
    return numer / (torch.exp(log_norm - logits[:, j]) + d_t)


def _unit(direction: np.ndarray | None, q: int, seed: int) -> torch.Tensor:
    d = np.random.default_rng([seed, 7]).standard_normal(q) if direction is None else np.asarray(direction, float)
    if d.shape != (q,) or not np.all(np.isfinite(d)) or np.linalg.norm(d) == 0:
        raise ValueError(f"direction must be a finite non-zero vector of length {q}, got {d!r}")
    return torch.as_tensor(d / np.linalg.norm(d), dtype=torch.float64)


def _code_deltas(model: HMoE, truth: Params, atom: int, step: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Exact changes ``(dbeta1 (H, D), da (H, D), db (H,))`` of generated atoms for codes ``z* + step``."""
    act = model.code_activation
    z = truth["z"][:, atom]
    dbeta1 = activation_difference(act, z @ truth["W1"].T, (step @ truth["W1"].T).expand(z.shape[0], -1))
    da = activation_difference(act, z @ truth["W2"].T, (step @ truth["W2"].T).expand(z.shape[0], -1))
    db = activation_difference(act, z @ truth["w3"], (step @ truth["w3"]).expand(z.shape[0]))
    return dbeta1, da, db


def split_params(model: MixtureModel, truth: Params, eps: float, r: float, *, atom: int = 0,
                 direction: np.ndarray | None = None, seed: int = 0) -> tuple[MixtureModel, Params]:
    """The bad-sequence member ``G_eps`` as a parameter set of the model with one more atom.

    The split atom keeps its index (``+eps``); its twin (``-eps``) is appended last (per head
    for an HMoE). Used for the naive difference and, in tests, for the Voronoi losses.
    """
    eps = check_positive_float("eps", eps)
    k = int(truth["beta0"].shape[-1])
    w = torch.exp(truth["beta0"][..., atom])
    beta0_split = torch.log(w / 2 + eps ** (r + 1) / 2)

    out = dict(truth)
    if isinstance(model, HMoE) and model.structure == "shared":
        step = eps * _unit(direction, model.code_dim, seed)
        z = truth["z"].clone()
        z[:, atom] = truth["z"][:, atom] + step
        out["z"] = torch.cat([z, (truth["z"][:, atom] - step).unsqueeze(1)], dim=1)
    else:
        b = truth["b"].clone()
        b[..., atom] = truth["b"][..., atom] + eps
        out["b"] = torch.cat([b, (truth["b"][..., atom] - eps).unsqueeze(-1)], dim=-1)
        for name in ("beta1", "a"):
            out[name] = torch.cat([truth[name], truth[name][..., atom, :].unsqueeze(-2)], dim=-2)
    beta0 = truth["beta0"].clone()
    beta0[..., atom] = beta0_split
    out["beta0"] = torch.cat([beta0, beta0_split.unsqueeze(-1)], dim=-1)
    return model.with_atoms(k + 1), out


def split_terms(model: MixtureModel, truth: Params, X: torch.Tensor, eps: float, r: float, atom: int,
                 direction: np.ndarray | None, seed: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """The response change of the split ``G_eps`` of ``truth``'s atom ``atom``, and its exact deltas.

    Parameters
    ----------
    model : FlatMoE (softmax gate) or HMoE
        The true model; the split adds one atom.
    truth : Params
        Unbatched true parameters.
    X : torch.Tensor
        ``(n, D)`` points where the response change is evaluated.
    eps, r : float
        Split size and loss order (the split atoms' weights differ by ``eps ** (r + 1)``).
    atom : int
        Which true atom is split.
    direction : numpy.ndarray or None
        Code-space direction of a shared HMoE split (a random unit vector from ``seed`` when ``None``).
    seed : int
        Seed of that random direction.

    Returns
    -------
    diff : torch.Tensor
        ``f_eps - f*`` on ``X``, shape ``(n,)``.
    parts : list of tuples
        Per split cell (one per head): ``(w*, dbeta1 (2, D), da (2, D), db (2,))``.
    """
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64)
    if isinstance(model, FlatMoE):
        if model.gate != "softmax":
            raise ValueError(f"the split check covers softmax gating, got gate={model.gate!r}")
        logits = X @ truth["beta1"].T + truth["beta0"]
        u = X @ truth["a"].T + truth["b"]
        if model.anchors is not None:
            an = model.anchors
            logits = torch.cat([X @ an["beta1"].T + an["beta0"], logits], dim=-1)
            u = torch.cat([X @ an["a"].T + an["b"], u], dim=-1)
        j = logits.shape[-1] - truth["beta0"].shape[-1] + atom
        experts = {"identity": u, "tanh": torch.tanh(u), "relu": torch.relu(u)}[model.expert]
        w = torch.exp(truth["beta0"][atom])
        dh = activation_difference(model.expert, u[:, j : j + 1], eps * signs)
        diff = split_response(logits, experts, j, 0.5 + eps ** (r + 1) / (2 * w), eps ** (r + 1) / w.item(),
                              torch.zeros_like(dh), dh)
        zero = torch.zeros(2, model.input_dim, dtype=torch.float64)
        return diff, [(w, zero, zero, eps * signs)]
    if not isinstance(model, HMoE):
        raise TypeError(f"the split check supports FlatMoE and HMoE, got {type(model).__name__}")
    free = model.to_nonshared(truth)
    scores, known = model.known_scores_and_experts(X)
    pi = model.head_weights(free, X)
    if model.structure == "shared":
        step = eps * _unit(direction, model.code_dim, seed)
        plus, minus = _code_deltas(model, truth, atom, step), _code_deltas(model, truth, atom, -step)
        deltas = [tuple(torch.stack([p[h], m[h]]) for p, m in zip(plus, minus, strict=True))
                  for h in range(model.n_heads)]
    else:
        zero = torch.zeros(2, model.input_dim, dtype=torch.float64)
        deltas = [(zero, zero, eps * signs)] * model.n_heads
    diff = torch.zeros(X.shape[0], dtype=torch.float64)
    parts = []
    for h in range(model.n_heads):
        logits = torch.cat([scores[:, h], X @ free["beta1"][h].T + free["beta0"][h]], dim=-1)
        experts = torch.cat([known[:, h], X @ free["a"][h].T + free["b"][h]], dim=-1)
        j = model.n_tokens + atom
        w = torch.exp(free["beta0"][h, atom])
        dbeta1, da, db = deltas[h]
        t = X @ dbeta1.T
        dh = X @ da.T + db
        diff = diff + pi[:, h] * split_response(logits, experts, j, 0.5 + eps ** (r + 1) / (2 * w),
                                                eps ** (r + 1) / w.item(), t, dh)
        parts.append((w, dbeta1, da, db))
    return diff, parts


def split_loss(parts: list[tuple[torch.Tensor, ...]], eps: float, r: float, kind: str) -> float:
    """``D1`` or ``D2r`` of ``G_eps`` from the exact deltas (two atoms per split cell).

    Parameters
    ----------
    parts : list of tuples
        The per-cell deltas returned by :func:`split_terms`.
    eps, r : float
        Split size and loss order, as given to :func:`split_terms`.
    kind : {"D1", "D2"}
        The Voronoi loss.

    Returns
    -------
    float
    """
    total = 0.0
    for w, dbeta1, da, db in parts:
        norms = torch.stack([dbeta1.norm(dim=-1), da.norm(dim=-1), db.abs()], dim=-1)
        power = 2.0 if kind == "D1" else r
        w_i = w / 2 + eps ** (r + 1) / 2
        total += float((w_i * (norms**power).sum(-1)).sum()) + eps ** (r + 1)
    return total


def inverse_bound_curve(
    model: MixtureModel,
    truth: Params,
    *,
    label: str,
    eps: Sequence[float] = tuple(DEFAULT_EPS),
    r_values: Sequence[float] = (1, 2),
    kinds: Sequence[str] = LOSS_KINDS,
    atom: int = 0,
    direction: np.ndarray | None = None,
    n_eval: int = 20_000,
    seed: int = 0,
) -> pd.DataFrame:
    """``rho(eps)`` along the bad sequence of one model (float64, fixed evaluation sample).

    Parameters
    ----------
    model : FlatMoE (softmax gate) or HMoE
        True model; ``truth`` its unbatched parameters.
    label : str
        Name of the model in the table.
    eps : sequence of float
        Perturbation sizes.
    r_values : sequence of float
        Exponents ``r``: the masses carry ``eps^{r+1}`` and ``D2`` uses exponent ``r``.
    kinds : sequence of {"D1", "D2"}
        Losses in the denominator (``D1`` has its own exponents; it is evaluated on the
        sequence of each ``r``).
    atom : int
        Index of the split atom (per head for an HMoE).
    direction : array, optional
        Code direction ``d`` of the shared HMoE (default: a seeded random unit vector).
    n_eval, seed : int
        Evaluation sample :func:`hmoe_sim.losses.eval_sample` (``Uniform([-1, 1]^D)``).

    Returns
    -------
    pandas.DataFrame
        Columns ``model, loss, r, eps, l2, l2_naive, D, rho, kink_points``. For ReLU
        experts ``kink_points`` counts the sample points with ``|a*_j^T x + b*_j| < eps``,
        where the split changes the expert's shape; at ``0`` the sample cannot see the kink
        term and ``l2`` holds only the mass term (NaN for smooth experts).
    """
    for k in kinds:
        check_choice("kind", k, LOSS_KINDS)
    atom = check_nonnegative_int("atom", atom)
    if atom >= truth["beta0"].shape[-1]:
        raise ValueError(f"atom={atom} but the truth has {truth['beta0'].shape[-1]} atoms")
    truth = model.cast(truth, device="cpu", dtype=torch.float64)
    model.batch_shape(truth)
    X = eval_sample(model.input_dim, n_eval, seed)
    f_star = model.predict(truth, X)
    rows = []
    for r in r_values:
        r = check_positive_float("r", r)
        if r < 1:
            raise ValueError(f"r must be >= 1, got {r!r}")
        for e in eps:
            e = check_positive_float("eps", e)
            diff, parts = split_terms(model, truth, X, e, r, atom, direction, seed)
            big, params = split_params(model, truth, e, r, atom=atom, direction=direction, seed=seed)
            naive = float(torch.sqrt(((big.predict(params, X) - f_star) ** 2).mean()))
            l2 = float(torch.sqrt((diff**2).mean()))
            kink = float("nan")
            if isinstance(model, FlatMoE) and model.expert == "relu":
                kink = float(((X @ truth["a"][atom] + truth["b"][atom]).abs() < e).sum())
            for kind in kinds:
                dist = split_loss(parts, e, r, kind)
                rows.append(dict(model=label, loss=kind, r=r, eps=e, l2=l2, l2_naive=naive, D=dist, rho=l2 / dist,
                                 kink_points=kink))
    return pd.DataFrame(rows)


#: label -> (preset name, overrides) of the models of the standard check
STANDARD_MODELS: dict[str, tuple[str, dict[str, object]]] = {
    "flat softmax, linear experts": ("softmax-linear", {}),
    "flat softmax, tanh experts": ("softmax-linear", {"expert": "tanh"}),
    "flat softmax, ReLU experts": ("softmax-relu", {}),
    "HMoE non-shared": ("hmoe-nonshared", {}),
    "HMoE shared (tanh)": ("hmoe-shared", {}),
    "HMoE shared (identity)": ("hmoe-shared", {"code_activation": "identity"}),
}


def inverse_bound_table(
    *,
    models: Sequence[str] | None = None,
    eps: Sequence[float] = tuple(DEFAULT_EPS),
    r_values: Sequence[float] = (1, 2),
    n_eval: int = 20_000,
    seed: int = 0,
    truth_seed: int = 0,
) -> pd.DataFrame:
    """:func:`inverse_bound_curve` for the :data:`STANDARD_MODELS` (preset truths, ``truth_seed``)."""
    names = list(STANDARD_MODELS) if models is None else list(models)
    frames = []
    for name in names:
        check_choice("model", name, STANDARD_MODELS)
        preset, overrides = STANDARD_MODELS[name]
        setup = make_preset(preset, seed=truth_seed, **overrides)
        frames.append(inverse_bound_curve(setup.true_model, setup.truth, label=name, eps=eps, r_values=r_values,
                                          n_eval=n_eval, seed=seed))
    return pd.concat(frames, ignore_index=True)
