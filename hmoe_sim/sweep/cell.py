"""One cell of a sweep: the fits of its replications and their losses (:func:`run_cell`).

Inside a cell the replications are fitted as one batch on the configured device
(``fit_batch`` over ``(R, n, D)`` data), every start of every replication at once; the
estimate of a replication is its start of least empirical risk, and the spread of the losses
over its near-optimal starts (:func:`near_optimal`) is recorded beside it. A cell sets the
number of torch threads to ``config.threads`` while it runs (at most the cores it may use,
:func:`usable_cores`), so its numbers do not depend on where it runs (in-process, a worker
process or a dask worker; identical bit for bit on the CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch

from hmoe_sim.data import sample_batch
from hmoe_sim.devices import resolve_device, resolve_dtype
from hmoe_sim.estimators import Bounds, fit_batch, init_near_truth, init_paper, init_random
from hmoe_sim.losses import l2_error, voronoi_losses_for
from hmoe_sim.models.base import MixtureModel, Params
from hmoe_sim.sweep.cells import Cell, cell_noise, data_seeds, effective_size, l2_seed, seed_int, sgd_seeds, start_seeds
from hmoe_sim.sweep.config import FitConfig, SeriesConfig, SweepConfig, parse_config
from hmoe_sim.sweep.setup import SeriesSetup, fit_bounds, series_setup

__all__ = ["fit_losses", "near_optimal", "run_cell", "usable_cores"]


@lru_cache(maxsize=8)
def _cached_config(config_key: str) -> SweepConfig:
    """The typed configuration of a resolved one (JSON text), parsed once per process."""
    return parse_config(json.loads(config_key))


@lru_cache(maxsize=64)
def _cached_setup(config_key: str, series_name: str, truth_seed: int
                  ) -> tuple[SweepConfig, SeriesConfig, SeriesSetup]:
    config = _cached_config(config_key)
    series = config.series_named(series_name)
    return config, series, series_setup(config, series, truth_seed)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity; ``os.cpu_count()`` where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit_losses(model: MixtureModel, params: Params, setup: SeriesSetup, config: SweepConfig) -> dict[str, np.ndarray]:
    """Every configured loss per fit; fits with non-finite parameters get NaN (never scored)."""
    spec = config.losses
    batch = next(iter(params.values())).shape[0]
    finite = torch.ones(batch, dtype=torch.bool, device=next(iter(params.values())).device)
    for v in params.values():
        finite &= torch.isfinite(v.reshape(batch, -1)).all(-1)
    names = spec.columns
    out = {name: np.full(batch, np.nan) for name in names}
    idx = torch.nonzero(finite).flatten()
    if idx.numel() == 0:
        return out
    sub = {k: v[idx] for k, v in params.items()}
    sel = idx.cpu().numpy()
    if spec.kinds:
        d = voronoi_losses_for(model, sub, setup.score_model, setup.score_truth, kinds=list(spec.kinds), r=spec.r)
        for k, v in d.items():
            out[k][sel] = v.detach().to("cpu", torch.float64).numpy()
    if spec.l2:
        l2 = l2_error(model, sub, setup.score_truth, true_model=setup.score_model, n_eval=spec.l2_n_eval,
                      seed=l2_seed(config.root_seed), x_dist=config.sample.x_dist)
        out["L2"][sel] = l2.detach().to("cpu", torch.float64).numpy()
    return out


def _starts(setup: SeriesSetup, fit: FitConfig, n: int, seeds: list[list[int]], bounds: Bounds,
            dtype: torch.dtype) -> Params:
    """Every start of a cell, batch shape ``(b, m)`` (or ``(b,)`` for one start).

    Start ``s < n_starts`` follows ``fit.init`` (``near_truth``, ``random`` or ``paper``: the
    group's start, whose noise shrinks with ``n``); starts ``n_starts ...`` are random starts.
    Each start is drawn from its own seed, so a start does not depend on which cell holds it.
    """
    n_main = fit.n_starts

    def one(s: int, seed: int) -> Params:
        if s >= n_main or fit.init == "random":
            return init_random(setup.fit_model, batch_shape=(), bounds=bounds, seed=seed, dtype=dtype,
                               scale=fit.random_scale)
        if fit.init == "paper":
            return init_paper(setup.fit_model, setup.score_model, setup.score_truth, n, batch_shape=(), seed=seed,
                              noise=fit.paper_noise, bounds=bounds, dtype=dtype)
        return init_near_truth(setup.fit_model, setup.score_model, setup.score_truth, batch_shape=(),
                               perturbation=fit.perturbation, seed=seed, bounds=bounds, dtype=dtype)

    per_rep = [[one(s, seed) for s, seed in enumerate(row)] for row in seeds]
    stacked = {k: torch.stack([torch.stack([p[k] for p in row]) for row in per_rep]) for k in per_rep[0][0]}
    return stacked if len(seeds[0]) > 1 else {k: v[:, 0] for k, v in stacked.items()}


def near_optimal(risk: np.ndarray, best: np.ndarray, n: int, loglik_margin: float, scale: np.ndarray) -> np.ndarray:
    """Which starts are statistically indistinguishable from the best one.

    A start is *near-optimal* when its Gaussian log-likelihood is within ``loglik_margin`` of
    the best start's: ``(n/2) log(RSS_s / RSS_best) <= margin``, used in its first-order form
    ``risk_s - risk_best <= (2 margin / n) risk_best``; with noise-free data (``risk_best`` at
    round-off) the margin is ``1e-20 * scale`` (``scale`` = mean square response), i.e. both
    reproduce the data to round-off. Non-finite risks are never near-optimal.

    Parameters
    ----------
    risk : array (b, m)
        Empirical risks of every start.
    best : array (b,)
        The estimate's risk per data set.
    """
    slack = np.maximum(2.0 * loglik_margin / n * best, 1e-20 * scale)
    return np.isfinite(risk) & (risk - best[:, None] <= slack[:, None])


def run_cell(config_dict: dict[str, Any], cell: Cell) -> pd.DataFrame:
    """Fit every replication of one cell and score it: one row per replication.

    Parameters
    ----------
    config_dict : dict
        A resolved configuration (:meth:`SweepConfig.to_dict`); plain data, so that it
        travels to worker processes.
    cell : Cell
        The cell to compute. A control (``"noise_free"`` or a ladder rung ``"perturb_<p>"``) is
        fitted to the same inputs without noise; a rung uses one near-truth start at
        perturbation ``p`` instead of the series' starts. A noisy cell's data have noise
        standard deviation :func:`~hmoe_sim.sweep.cells.cell_noise` (its noise level on a noise
        axis, else the truth's ``noise_std``); the inputs and the noise draw do not depend on it.

    Returns
    -------
    pandas.DataFrame
        Columns ``truth, series, structure, control, n, noise_std`` (the data's noise standard
        deviation, 0 for a control), ``n_eff`` (``n / noise_std**2``, ``inf`` for a control),
        ``replication, chunk, data_seed``, one
        column per loss (the estimate: the start of least empirical risk), per loss ``L`` the
        smallest and largest loss over the near-optimal starts (``L_min``, ``L_max``,
        :func:`near_optimal`), ``n_starts`` and ``n_near_optimal``, and the estimator's
        certificate fields (with ``boundary_params``: the bounds the fit ends at, e.g.
        ``"a:hi,beta0:lo"``; ``start``: the index of the kept start; ``stop_reason``: the test that
        stopped the kept fit, e.g. ``"ftol"``, ``"resolution"``, ``"max_iter"``). ``params`` holds the kept
        start's parameter vector (float64, in ``fit_model.flatten`` order: the series' fitted
        model, :func:`hmoe_sim.sweep.stored.stored_params` turns it back into parameters), so that
        losses can be recomputed and decomposed without refitting.
    """
    config, series, setup = _cached_setup(json.dumps(config_dict, sort_keys=True), cell.series, cell.truth)
    fit = series.fit
    rung = config.control_perturbations.get(cell.control)
    if rung is not None:  # a rung of the ladder: one near-truth start at its perturbation
        fit = dataclasses.replace(fit, init="near_truth", perturbation=rung, n_starts=1, random_starts=0)
    root = config.root_seed
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype)
    b, m = len(cell.reps), fit.n_starts + fit.random_starts
    noise = cell_noise(config, cell, setup.noise_std)  # every control is noise-free
    with _torch_threads(min(config.threads, usable_cores())):  # more threads than cores: capped
        seeds = data_seeds(root, cell.truth, cell.n, cell.reps)
        X, y = sample_batch(setup.data_model, setup.data_truth, cell.n, noise, seeds,
                            x_dist=config.sample.x_dist, device=device, dtype=dtype)
        bounds = fit_bounds(fit.bounds)
        init = _starts(setup, fit, cell.n, start_seeds(root, cell.truth, cell.n, cell.reps, m), bounds, dtype)
        result = fit_batch(setup.fit_model, X, y, init, method=fit.method, bounds=bounds, max_iter=fit.max_iter,
                           tol=fit.tol, device=device, dtype=dtype, truth=setup.score_truth,
                           seed=sgd_seeds(root, cell.truth, cell.n, cell.reps), **fit.options)
        every = result.all_starts if result.all_starts is not None else result
        all_losses = {k: v.reshape(b, m) for k, v in fit_losses(setup.fit_model, every.params, setup, config).items()}
        scale = y.square().mean(-1).to("cpu", torch.float64).numpy()
        theta_all = setup.fit_model.flatten(every.params).detach().to("cpu", torch.float64).numpy()
    risk_all = every.risk.detach().to("cpu", torch.float64).numpy().reshape(b, m)
    best = result.start.cpu().numpy()
    kept = theta_all.reshape(b, m, -1)[np.arange(b), best]
    near = near_optimal(risk_all, risk_all[np.arange(b), best], cell.n, fit.near_optimal_loglik, scale)
    near[np.arange(b), best] = True
    losses: dict[str, np.ndarray] = {}
    for name, values in all_losses.items():
        losses[name] = values[np.arange(b), best]
        inside = np.where(near, values, np.nan)
        with np.errstate(all="ignore"):
            losses[f"{name}_min"] = np.nanmin(np.where(np.isnan(inside), np.inf, inside), axis=1)
            losses[f"{name}_max"] = np.nanmax(np.where(np.isnan(inside), -np.inf, inside), axis=1)
        for extreme in ("min", "max"):
            col = losses[f"{name}_{extreme}"]
            col[~np.isfinite(col)] = np.nan
    losses["params"] = list(kept)  # the kept start's parameter vector, fit_model.flatten order
    losses["n_starts"] = np.full(b, m, dtype=np.int64)
    losses["n_near_optimal"] = near.sum(1).astype(np.int64)
    frame = result.certificate_frame().drop(columns="fit")  # position in the batch: depends on the cut
    head = pd.DataFrame({
        "truth": np.full(b, cell.truth, dtype=np.int64),
        "series": cell.series,
        "structure": series.structure or "",
        "control": cell.control,
        "n": np.full(b, cell.n, dtype=np.int64),
        "noise_std": np.full(b, noise, dtype=np.float64),
        "n_eff": np.full(b, effective_size(cell.n, noise), dtype=np.float64),
        "replication": np.asarray(cell.reps, dtype=np.int64),
        "chunk": np.full(b, cell.chunk, dtype=np.int64),
        "data_seed": np.asarray([seed_int(s) for s in seeds], dtype=np.int64),
    })
    loss_frame = pd.DataFrame(losses)
    frame = frame.drop(columns=[c for c in frame.columns if c in head.columns or c in loss_frame.columns])
    return pd.concat([head, loss_frame, frame], axis=1)
