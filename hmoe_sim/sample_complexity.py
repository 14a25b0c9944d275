"""Sample complexity along the theory's sequences ``G_eps -> G*`` (no fitting).

For a parameter set ``G_eps`` near the truth, the number of observations a two-point test
needs to tell ``G_eps`` from ``G*`` is

.. math::  n^*(\\epsilon) = \\frac{\\sigma^2 z}{\\|f_{G_\\epsilon} - f_{G^*}\\|^2_{L^2(\\mu)}},
    \\qquad z = (z_{1-\\alpha} + z_{1-\\beta})^2.

Why: with ``Y = f(X) + N(0, sigma^2)`` and ``Delta = f_{G_eps} - f_{G*}``, the Neyman-Pearson
test of ``H0: f = f_{G*}`` against ``H1: f = f_{G_eps}`` rejects when
``T = sum_i (Y_i - f_{G*}(X_i)) Delta(X_i)`` is large. Given the inputs, ``T`` is
``N(0, sigma^2 S)`` under ``H0`` and ``N(S, sigma^2 S)`` under ``H1`` with
``S = sum_i Delta(X_i)^2 ~ n ||Delta||^2``, so level ``alpha`` and power ``1 - beta`` need
``sqrt(S) / sigma >= z_{1-alpha} + z_{1-beta}``: the formula above. The Neyman-Pearson test
is the most powerful one, so no test reaches both error levels with fewer observations (given
the inputs, with ``S`` replaced by its mean ``n ||Delta||^2``). By Le Cam's two-point argument
this is, up to the constants of the weak triangle inequality of ``D``, a lower bound on the
sample size any estimator needs to be accurate to order ``D(G_eps, G*)`` uniformly over a
class containing both measures (the over-specified class ``G_k`` of the minimax bounds does).
It is a bound along one sequence: a small ``n*`` on these sequences does not prove that
estimation is fast, a large one proves that it is slow. Default ``alpha = beta = 0.05``:
``z = (2 z_{0.95})^2 = 10.82``. ``sigma`` and ``z`` scale ``n*`` by constants; the exponents
do not depend on them.

Sequences (:mod:`hmoe_sim.theory_checks`): the inverse-bound split of one true atom, masses
``w*/2 + eps^{r+1}/2`` each, ``r = 1, 2, 3, 4``, and its limit ``r = inf``, the
*mass-conserving* split (masses ``w*/2`` each, so the total mass is exact). For experts that
are linear in a free bias (flat linear experts, non-shared HMoE) the mass-conserving split
leaves ``f`` unchanged exactly -- the *exact flat family* -- so ``||f_eps - f*|| = 0`` and
``n* = inf``: it is stored as ``inf``, never as a number. The term-by-term difference of
:func:`hmoe_sim.theory_checks.split_response` gives an exact ``0`` there (the two bias terms
``0.5 eps`` and ``-0.5 eps`` cancel exactly in floating point); for tanh experts and for the
shared structure the same split changes ``f`` at order ``eps^2``.

Local exponents are ``-d log n* / d log x`` for ``x = D1``, ``D_{2,r}`` or ``eps``, fitted by
OLS of ``log n*`` on ``log x`` over sliding windows of consecutive grid points
(:func:`local_exponents`): ``n* ~ x^{-exponent}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np
import pandas as pd
import torch

from hmoe_sim._validation import check_choice, check_positive_float, check_positive_int
from hmoe_sim.losses import eval_sample
from hmoe_sim.models.base import MixtureModel, Params
from hmoe_sim.models.hmoe import HMoE
from hmoe_sim.models.presets import make_preset
from hmoe_sim.theory_checks import DEFAULT_EPS, inverse_bound_curve, split_loss, split_params, split_terms

__all__ = [
    "MASS_CONSERVING",
    "SAMPLE_COMPLEXITY_MODELS",
    "exponent_table",
    "local_exponents",
    "power_law_exponent",
    "sample_complexity_curve",
    "sample_complexity_table",
    "separation_sample_size",
    "two_point_z",
]

#: label of the mass-conserving (``r = inf``) sequence
MASS_CONSERVING = "mass-conserving"


def two_point_z(level: float = 0.05, power: float = 0.95) -> float:
    """``z = (z_{1-level} + z_{power})^2`` of the one-sided two-point (Neyman-Pearson) test.

    Parameters
    ----------
    level : float
        Type-I error ``alpha`` in ``(0, 1)``.
    power : float
        Power ``1 - beta`` in ``(0, 1)``, larger than ``level``.

    Examples
    --------
    >>> round(two_point_z(0.05, 0.95), 4)
    10.8222
    """
    for name, value in (("level", level), ("power", power)):
        v = check_positive_float(name, value)
        if v >= 1:
            raise ValueError(f"{name} must lie in (0, 1), got {value!r}")
    if power <= level:
        raise ValueError(f"power must exceed level, got power={power!r}, level={level!r}")
    normal = NormalDist()
    return (normal.inv_cdf(1 - level) + normal.inv_cdf(power)) ** 2


def separation_sample_size(l2: np.ndarray | float, noise_std: float, z: float) -> np.ndarray:
    """``n* = noise_std^2 z / l2^2`` elementwise; ``inf`` where ``l2 == 0`` (no test separates).

    Parameters
    ----------
    l2 : array-like
        ``||f_{G_eps} - f_{G*}||_{L^2(mu)}``, non-negative.
    noise_std : float
        Noise standard deviation ``sigma`` (> 0).
    z : float
        Separation constant (:func:`two_point_z`).
    """
    sigma = check_positive_float("noise_std", noise_std)
    z = check_positive_float("z", z)
    l2 = np.asarray(l2, dtype=np.float64)
    if not np.all(np.isfinite(l2)) or np.any(l2 < 0):
        raise ValueError(f"l2 must be finite and non-negative, got {l2!r}")
    out = np.full(l2.shape, np.inf)
    positive = l2 > 0
    out[positive] = sigma**2 * z / l2[positive] ** 2
    return out


def _check_curve(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"x and y must be 1-D of the same length >= 2, got shapes {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0) and np.all(y > 0)):
        raise ValueError("x and y must be finite and positive (log-log fit); drop infinite n* first")
    return np.log(x), np.log(y)


def power_law_exponent(x: np.ndarray, y: np.ndarray) -> float:
    """``p`` of the OLS fit ``log y = c - p log x`` (so ``y ~ x^{-p}``)."""
    lx, ly = _check_curve(x, y)
    if np.ptp(lx) == 0:
        raise ValueError("x must take at least two distinct values")
    return float(-np.polyfit(lx, ly, 1)[0])


def local_exponents(x: np.ndarray, y: np.ndarray, *, window: int = 5) -> np.ndarray:
    """Windowed local exponents ``-d log y / d log x``, one per point.

    Point ``i`` gets the OLS exponent (:func:`power_law_exponent`) over the ``window``
    consecutive points centred on it; near the ends the window is shifted to stay inside the
    curve (so the first and last ``window // 2`` points share their window's value). Points
    must be ordered along the curve.

    Parameters
    ----------
    x, y : array
        Positive, finite, same length ``>= window``.
    window : int
        Points per window (``>= 2``; ``2`` gives slopes of consecutive points).
    """
    window = check_positive_int("window", window)
    if window < 2:
        raise ValueError(f"window must be at least 2, got {window!r}")
    lx, ly = _check_curve(x, y)
    if lx.size < window:
        raise ValueError(f"need at least window={window} points, got {lx.size}")
    out = np.empty(lx.size)
    for i in range(lx.size):
        start = min(max(i - window // 2, 0), lx.size - window)
        part = slice(start, start + window)
        out[i] = -np.polyfit(lx[part], ly[part], 1)[0]
    return out


def _mass_conserving_rows(model: MixtureModel, truth: Params, X: torch.Tensor, f_star: torch.Tensor,
                          eps: Sequence[float], atom: int, direction: np.ndarray | None,
                          seed: int) -> list[dict[str, float]]:
    """``l2``, naive ``l2`` and ``D1`` along the ``r = inf`` split (masses ``w*/2``: ``eps^{r+1} = 0``)."""
    rows = []
    for e in eps:
        e = check_positive_float("eps", e)
        diff, parts = split_terms(model, truth, X, e, math.inf, atom, direction, seed)
        big, params = split_params(model, truth, e, math.inf, atom=atom, direction=direction, seed=seed)
        naive = float(torch.sqrt(((big.predict(params, X) - f_star) ** 2).mean()))
        rows.append(dict(eps=e, l2=float(torch.sqrt((diff**2).mean())), l2_naive=naive,
                         D1=split_loss(parts, e, math.inf, "D1"), D2=np.nan))
    return rows


def sample_complexity_curve(
    model: MixtureModel,
    truth: Params,
    *,
    label: str,
    noise_std: float,
    eps: Sequence[float] = tuple(DEFAULT_EPS),
    r_values: Sequence[float] = (1, 2, 3, 4),
    mass_conserving: bool = True,
    level: float = 0.05,
    power: float = 0.95,
    atom: int = 0,
    direction: np.ndarray | None = None,
    n_eval: int = 20_000,
    seed: int = 0,
    window: int = 5,
) -> pd.DataFrame:
    """``n*(eps)`` along the inverse-bound sequences of one model (float64, fixed evaluation sample).

    Parameters
    ----------
    model, truth : MixtureModel, dict of torch.Tensor
        True model (FlatMoE with softmax gate, or HMoE) and its unbatched parameters.
    label : str
        Name of the model in the table.
    noise_std : float
        Noise standard deviation ``sigma`` of the regression model.
    eps : sequence of float
        Split sizes, ordered (decreasing, as :data:`~hmoe_sim.theory_checks.DEFAULT_EPS`).
    r_values : sequence of float
        Exponents ``r >= 1`` of the inverse-bound sequences (masses carry ``eps^{r+1}``).
    mass_conserving : bool
        Also compute the ``r = inf`` split (the exact flat family where ``f`` does not change).
    level, power : float
        Error levels of the two-point test (:func:`two_point_z`).
    atom, direction, n_eval, seed
        As in :func:`hmoe_sim.theory_checks.inverse_bound_curve`.
    window : int
        Points per window of the local exponents.

    Returns
    -------
    pandas.DataFrame
        One row per (sequence, eps): ``model, sequence, r, eps, l2, l2_naive, D1, D2, rho_D1,
        n_star, n_star_D1sq, local_exponent_D1, local_exponent_D2, local_exponent_eps,
        noise_std, z``. ``D2`` is ``D_{2,r}`` (NaN for the mass-conserving split, where ``r`` is
        not finite); ``n_star`` is ``inf`` where ``l2 == 0`` and the local exponents are then NaN;
        ``n_star_D1sq = n* D1^2 = sigma^2 z / rho_D1^2`` is bounded exactly when
        ``||f_eps - f*|| / D1`` is bounded below.
    """
    z = two_point_z(level, power)
    sigma = check_positive_float("noise_std", noise_std)
    eps = [check_positive_float("eps", e) for e in eps]
    frames = []
    if r_values:
        curve = inverse_bound_curve(model, truth, label=label, eps=eps, r_values=r_values, kinds=("D1", "D2"),
                                    atom=atom, direction=direction, n_eval=n_eval, seed=seed)
        wide = curve.pivot_table(index=["r", "eps", "l2", "l2_naive"], columns="loss", values="D").reset_index()
        wide["sequence"] = [f"r={r:g}" for r in wide["r"]]
        frames.append(wide)
    if mass_conserving:
        cast = model.cast(truth, device="cpu", dtype=torch.float64)
        X = eval_sample(model.input_dim, n_eval, seed)
        rows = _mass_conserving_rows(model, cast, X, model.predict(cast, X), eps, atom, direction, seed)
        frames.append(pd.DataFrame(rows).assign(r=math.inf, sequence=MASS_CONSERVING))
    if not frames:
        raise ValueError("nothing to compute: give r_values or mass_conserving=True")
    table = pd.concat(frames, ignore_index=True)
    table.insert(0, "model", label)
    table["rho_D1"] = table["l2"] / table["D1"]
    table["n_star"] = separation_sample_size(table["l2"].to_numpy(), sigma, z)
    table["n_star_D1sq"] = table["n_star"] * table["D1"] ** 2
    order = {e: i for i, e in enumerate(eps)}
    parts = []
    for _, part in table.groupby("sequence", sort=False):
        part = part.iloc[np.argsort([order[e] for e in part["eps"]], kind="stable")].copy()
        n_star = part["n_star"].to_numpy()
        for against, column in (("D1", "D1"), ("D2", "D2"), ("eps", "eps")):
            values = part[column].to_numpy(dtype=np.float64)
            local = np.full(len(part), np.nan)
            if np.all(np.isfinite(n_star)) and np.all(np.isfinite(values)) and len(part) >= window:
                local = local_exponents(values, n_star, window=window)
            part[f"local_exponent_{against}"] = local
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    table["noise_std"] = sigma
    table["z"] = z
    columns = ["model", "sequence", "r", "eps", "l2", "l2_naive", "D1", "D2", "rho_D1", "n_star", "n_star_D1sq",
               "local_exponent_D1", "local_exponent_D2", "local_exponent_eps", "noise_std", "z"]
    return table[columns]


#: label -> (preset, overrides, structure given to the fitted model) of the sample-complexity check;
#: ``"nonshared"`` on the ``hmoe-shared`` preset converts the shared truth with ``HMoE.to_nonshared``
#: (the headline's paired design: the same atoms, free instead of generated)
SAMPLE_COMPLEXITY_MODELS: dict[str, tuple[str, dict[str, object], str | None]] = {
    "flat softmax, linear experts": ("softmax-linear", {}, None),
    "flat softmax, tanh experts": ("softmax-linear", {"expert": "tanh"}, None),
    "HMoE non-shared": ("hmoe-nonshared", {}, None),
    "HMoE shared (tanh)": ("hmoe-shared", {}, None),
    "HMoE shared (identity)": ("hmoe-shared", {"code_activation": "identity"}, None),
    "HMoE non-shared, same atoms as shared (identity)": ("hmoe-shared", {"code_activation": "identity"},
                                                         "nonshared"),
}


def sample_complexity_table(
    *,
    models: Sequence[str] | None = None,
    eps: Sequence[float] = tuple(DEFAULT_EPS),
    r_values: Sequence[float] = (1, 2, 3, 4),
    level: float = 0.05,
    power: float = 0.95,
    noise_std: float | None = None,
    n_eval: int = 20_000,
    seed: int = 0,
    truth_seed: int = 0,
    window: int = 5,
) -> pd.DataFrame:
    """:func:`sample_complexity_curve` for :data:`SAMPLE_COMPLEXITY_MODELS` (preset truths, ``truth_seed``).

    ``noise_std`` defaults to each preset's own (``0.1`` for all of them, ``nu = 0.01``).
    """
    names = list(SAMPLE_COMPLEXITY_MODELS) if models is None else list(models)
    frames = []
    for name in names:
        check_choice("model", name, SAMPLE_COMPLEXITY_MODELS)
        preset, overrides, structure = SAMPLE_COMPLEXITY_MODELS[name]
        setup = make_preset(preset, seed=truth_seed, **overrides)
        model, truth = setup.true_model, setup.truth
        if structure is not None:
            assert isinstance(model, HMoE)
            truth = model.to_nonshared(truth)
            model = model.with_structure(structure)
        sigma = setup.noise_std if noise_std is None else noise_std
        frames.append(sample_complexity_curve(model, truth, label=name, noise_std=sigma, eps=eps, r_values=r_values,
                                              level=level, power=power, n_eval=n_eval, seed=seed, window=window))
    return pd.concat(frames, ignore_index=True)


def exponent_table(table: pd.DataFrame, *, window: int = 5) -> pd.DataFrame:
    """Exponents of ``n* ~ x^{-p}`` per (model, sequence, x) from a :func:`sample_complexity_table`.

    Parameters
    ----------
    table : pandas.DataFrame
        Rows of :func:`sample_complexity_curve`.
    window : int
        Points per window of the local exponents.

    Returns
    -------
    pandas.DataFrame
        Columns ``model, sequence, against, exponent_all`` (OLS over the whole eps grid),
        ``exponent_large_eps`` and ``exponent_small_eps`` (the first and last windows),
        ``local_min, local_max`` (over all windows), ``eps_max, eps_min, rho_D1_large_eps,
        rho_D1_small_eps, n_star_finite``. ``against`` is ``D1``, ``D2`` (``D_{2,r}``) or ``eps``.
        A sequence whose ``n*`` is infinite at every eps (the exact flat family) gets one row per
        ``against`` with ``n_star_finite = False`` and NaN exponents: there is no finite curve.
    """
    rows = []
    for (model, sequence), part in table.groupby(["model", "sequence"], sort=False):
        part = part.sort_values("eps", ascending=False)
        n_star = part["n_star"].to_numpy()
        finite = np.isfinite(n_star)
        for against in ("D1", "D2", "eps"):
            values = part[against].to_numpy(dtype=np.float64)
            if not np.all(np.isfinite(values)):
                continue
            row: dict[str, object] = dict(model=model, sequence=sequence, against=against,
                                          eps_max=float(part["eps"].max()), eps_min=float(part["eps"].min()),
                                          rho_D1_large_eps=float(part["rho_D1"].iloc[0]),
                                          rho_D1_small_eps=float(part["rho_D1"].iloc[-1]),
                                          n_star_finite=bool(finite.all()))
            if finite.all() and len(part) >= window:
                local = local_exponents(values, n_star, window=window)
                row.update(exponent_all=power_law_exponent(values, n_star), exponent_large_eps=float(local[0]),
                           exponent_small_eps=float(local[-1]), local_min=float(local.min()),
                           local_max=float(local.max()))
            elif finite.any():
                raise ValueError(f"{model!r}, {sequence!r}: n* is infinite at some eps but not all; "
                                 "no exponent is defined on a broken curve")
            else:
                row.update(exponent_all=np.nan, exponent_large_eps=np.nan, exponent_small_eps=np.nan,
                           local_min=np.nan, local_max=np.nan)
            rows.append(row)
    columns = ["model", "sequence", "against", "exponent_all", "exponent_large_eps", "exponent_small_eps",
               "local_min", "local_max", "eps_max", "eps_min", "rho_D1_large_eps", "rho_D1_small_eps",
               "n_star_finite"]
    return pd.DataFrame(rows, columns=columns)
