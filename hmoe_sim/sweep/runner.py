"""Run a sweep: one cell's fits and losses, and the fan-out of cells over processes or dask.

Inside a cell the replications are fitted as one batch on the configured device
(``fit_batch`` over ``(R, n, D)`` data). Cells run in-process for one job, in a pool of
worker processes for several (``concurrent.futures.ProcessPoolExecutor``, spawned), or on a
dask.distributed cluster through joblib's dask backend. Every cell sets the number of torch
threads to ``config.threads`` while it runs, so its numbers do not depend on the backend or
on the number of jobs (results are identical bit for bit on the CPU). Finished cells are
written by the calling process, each atomically, as they arrive; a rerun verifies the stored
cells and computes only the missing or invalid ones (see :mod:`hmoe_sim.sweep.storage`).

Order of work in :func:`run_sweep`: every check first (arguments, configuration, estimator
options, memory, the output directory, the dask scheduler), then the run directory's lock,
then ``config.resolved.json``, then the cells, then the tables (:func:`write_tables`).

Stopping a sweep. Ctrl-C (SIGINT) or SIGTERM stops the worker processes, keeps every
finished cell and raises :class:`SweepInterrupted` ("interrupted; N of M cells done, rerun
the same command to resume"); no child process outlives the sweep. SIGKILL cannot be
caught: the kernel releases the lock and kills the worker processes with their parent (Linux
``PR_SET_PDEATHSIG``; elsewhere each worker checks twice a second that its parent is alive and
exits when it is not), and the pool's resource tracker exits once they are gone. A dask
LocalCluster's workers are watched by their nannies, which exit when the sweep is gone. The
next sweep into the directory takes over the stale lock with a notice and removes the partial
temporary files the killed one may have left.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hmoe_sim.data import sample_batch
from hmoe_sim.devices import resolve_device, resolve_dtype
from hmoe_sim.estimators import Bounds, fit_batch, init_near_truth, init_paper, init_random
from hmoe_sim.estimators.api import _ANALYTIC_JACOBIAN_COPIES, _JACOBIAN_COPIES
from hmoe_sim.identifiability import nonidentifiable_reason
from hmoe_sim.losses import l2_error, voronoi_losses_for
from hmoe_sim.models.base import MixtureModel, Params
from hmoe_sim.models.hmoe import HMoE
from hmoe_sim.models.presets import make_preset
from hmoe_sim.sweep.cells import Cell, cell_hash, data_seeds, l2_seed, plan_cells, seed_int, sgd_seeds, start_seeds
from hmoe_sim.sweep.config import SweepConfig
from hmoe_sim.sweep.ensemble import ensemble_table, per_truth_table, structure_pairs
from hmoe_sim.sweep.report import boundary_table, loss_columns, rates_table, summary_table
from hmoe_sim.sweep.storage import (
    BOUNDARY_FILE,
    ENSEMBLE_FILE,
    PER_TRUTH_FILE,
    RATES_FILE,
    SUMMARY_FILE,
    CellInvalid,
    RunDir,
)

__all__ = ["SeriesSetup", "SweepInterrupted", "SweepOutcome", "run_cell", "run_sweep", "series_setup",
           "check_estimator_options", "check_file_names", "check_memory", "derived_tables", "near_optimal",
           "write_tables", "BACKENDS",
           "PLAIN_PROGRESS_SECONDS"]

BACKENDS = ("local", "dask")
#: without a terminal, a plain progress line at most this often (and after the last cell)
PLAIN_PROGRESS_SECONDS = 30.0
#: how often a worker process checks that the sweep that started it is still alive
ORPHAN_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class SeriesSetup:
    """What one series fits and how it is scored.

    Attributes
    ----------
    data_model, data_truth
        Model and parameters that generate the data (the preset's truth).
    fit_model
        The over-specified model fitted to the data.
    score_model, score_truth
        The truth expressed in ``fit_model``'s structure (for a non-shared fit of a shared
        truth: ``HMoE.to_nonshared(truth)``); Voronoi losses, L2 errors and near-truth starts
        use it. Both structures are scored on the same atoms ``model.mixing_measure``.
    noise_std : float
        Noise standard deviation of the data.
    """

    data_model: MixtureModel
    data_truth: Params
    fit_model: MixtureModel
    score_model: MixtureModel
    score_truth: Params
    noise_std: float


def series_setup(config: SweepConfig, series: dict[str, Any], truth_seed: int | None = None) -> SeriesSetup:
    """Build the models and truths of one series of ``config`` on truth ``truth_seed``.

    ``truth_seed`` defaults to the configuration's first truth seed.
    """
    seed = config.truth_seeds[0] if truth_seed is None else truth_seed
    setup = make_preset(series["preset"], seed=seed, **series["truth_options"])
    true_model, truth, fit_model = setup.true_model, setup.truth, setup.fit_model
    score_model, score_truth = true_model, truth
    structure = series.get("structure")
    if structure is not None and isinstance(fit_model, HMoE) and structure != fit_model.structure:
        assert isinstance(true_model, HMoE)
        fit_model = fit_model.with_structure(structure)
        score_model, score_truth = true_model.with_structure(structure), true_model.to_nonshared(truth)
    return SeriesSetup(true_model, truth, fit_model, score_model, score_truth, setup.noise_std)


@lru_cache(maxsize=64)
def _cached_setup(config_key: str, series_name: str, truth_seed: int
                  ) -> tuple[SweepConfig, dict[str, Any], SeriesSetup]:
    config = SweepConfig(json.loads(config_key))
    series = next(s for s in config.series if s["name"] == series_name)
    return config, series, series_setup(config, series, truth_seed)


def _bounds(spec: dict[str, Any]) -> Bounds:
    kwargs: dict[str, Any] = {}
    if "default" in spec:
        kwargs["default"] = tuple(spec["default"])
    if "boundary_tol" in spec:
        kwargs["boundary_tol"] = spec["boundary_tol"]
    return Bounds({k: tuple(v) for k, v in spec.get("limits", {}).items()}, **kwargs)


def check_estimator_options(config: SweepConfig) -> None:
    """Validate every series' estimator settings before any fitting.

    Checks ``fit.bounds`` (keys ``default``, ``limits``, ``boundary_tol``; names must be
    parameters of the fitted model) and ``fit.options`` (extra keyword arguments of
    ``fit_batch`` / ``fit_multistart``), that the device exists, that one cell can fit
    in the device's memory (:func:`check_memory`), and that every series' truth is
    identifiable at its true size (:func:`hmoe_sim.identifiability.nonidentifiable_reason`,
    checked on the series' first truth seed) unless ``allow_nonidentifiable = true``.

    Raises
    ------
    ValueError
        Naming the offending key.
    """
    resolve_device(config.data["device"])
    reserved = {"model", "X", "y", "init", "method", "bounds", "max_iter", "tol", "device", "dtype", "truth", "seed",
                "show_progress", "mask"}
    for i, s in enumerate(config.series):
        key = f"series[{i}].fit"
        fit = s["fit"]
        unknown = sorted(set(fit["bounds"]) - {"default", "limits", "boundary_tol"})
        if unknown:
            raise ValueError(f"unknown config key(s) {[f'{key}.bounds.{u}' for u in unknown]}; "
                             "known: default, limits, boundary_tol")
        setup = series_setup(config, s, s["truth_seeds"][0])
        try:
            bounds = _bounds(fit["bounds"])
            bounds.check_names(setup.fit_model)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config key {key + '.bounds'!r}: {err}") from err
        accepted = set(inspect.signature(fit_batch).parameters) - reserved
        bad = sorted(set(fit["options"]) - accepted)
        if bad:
            raise ValueError(f"unknown config key(s) {[f'{key}.options.{b}' for b in bad]}; "
                             f"fit_batch accepts {sorted(accepted)}")
        check_memory(config, s, setup)
        if not config.data["allow_nonidentifiable"]:
            reason = nonidentifiable_reason(s["preset"], s["truth_options"], seed=s["truth_seeds"][0])
            if reason is not None:
                raise ValueError(f"series[{i}] ({s['name']!r}, preset {s['preset']!r}) is not identifiable at its "
                                 f"true size: {reason}; a rate measured on it is not a rate of its parameters. "
                                 "Set allow_nonidentifiable = true to run it anyway")


def _read_int(path: str) -> int | None:
    """The integer a one-value file holds (``None`` when missing, unreadable or e.g. ``max``)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_available_memory() -> int:
    """Memory this process can still use, in bytes: the least of what applies.

    ``MemAvailable`` of ``/proc/meminfo``, the address-space limit (``RLIMIT_AS``, when set)
    and the cgroup's limit less its usage (cgroup v2 ``memory.max`` / ``memory.current``, or
    v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``); physical RAM when none is known.
    """
    import resource

    candidates = [int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and soft > 0:
        candidates.append(int(soft))
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None and limit < 1 << 60:
            candidates.append(max(0, limit - (_read_int(usage_file) or 0)))
            break
    return min(candidates)


def _device_memory(device: torch.device) -> int:
    """Memory of ``device`` in bytes: total for a GPU, available to this process for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return _cpu_available_memory()


#: what a temporary name adds to a file name (``.NAME.<12 hex>.tmp``)
_TMP_EXTRA = len(".") + len(".0123456789ab.tmp")


def check_file_names(config: SweepConfig, run: RunDir) -> None:
    """Raise when a cell file or the figure of ``config`` would have too long a file name.

    Checked on the longest cell key of every series (largest truth seed, control, ``n`` and
    block) with its hash and the temporary-file suffix, and on ``<name>.png``, against the
    file-name limit of the file system holding ``run`` (255 when unknown).

    Raises
    ------
    ValueError
        Naming the config key (``series[i].name`` or ``name``), its value and the length.
    """
    probe = run.path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        limit = int(os.pathconf(probe, "PC_NAME_MAX"))
    except (OSError, ValueError):
        limit = 255
    blocks = -(-config.replications // int(config.data["sample"]["chunk"]))
    for i, s in enumerate(config.series):
        for control in ["", *config.controls]:
            cell = Cell(max(s["truth_seeds"]), s["name"], control, max(config.sizes), blocks - 1, ())
            length = len(run.cell_path(cell, "0" * 16).name.encode()) + _TMP_EXTRA
            if length > limit:
                raise ValueError(f"config key 'series[{i}].name': {s['name']!r} makes cell file names of {length} "
                                 f"characters, more than the {limit} a file name may have; shorten it")
    for part in f"{config.name}.png".split("/"):
        if len(part.encode()) + _TMP_EXTRA > limit:
            raise ValueError(f"config key 'name': {config.name!r} makes a figure file name of "
                             f"{len(part.encode())} characters, too long for a file name (limit {limit}); shorten it")


def check_memory(config: SweepConfig, series: dict[str, Any], setup: SeriesSetup) -> None:
    """Raise when one cell of ``series`` plainly cannot fit in the device's memory.

    A lower bound of what one cell needs at the largest ``n``: its data (``min(sample.chunk,
    replications)`` data sets of ``n * (D + 1)`` float64 numbers, drawn at once) plus the
    Jacobian work of a single fit (``copies * n * P`` numbers of the fit dtype, as in
    :func:`~hmoe_sim.estimators.auto_chunk_size`); separately, the L2 evaluation sample of the
    cell (the points and the fitted values there). Each is compared with the device's total
    memory (for the CPU: the memory available to this process, :func:`_cpu_available_memory`),
    so only a configuration that cannot run on this machine now is refused. A
    ``fit.options.max_memory`` below what one fit's Jacobian needs at the largest ``n`` is
    refused too.

    Raises
    ------
    ValueError
        Naming ``sample.sizes`` (or ``losses.l2_n_eval``), the value and the memory needed.
    """
    device = resolve_device(config.data["device"])
    itemsize = torch.empty((), dtype=resolve_dtype(config.data["dtype"])).element_size()
    available = _device_memory(device)
    batch = min(int(config.data["sample"]["chunk"]), config.replications)
    dim = setup.fit_model.input_dim
    copies = _ANALYTIC_JACOBIAN_COPIES if hasattr(setup.fit_model, "value_and_jacobian") else _JACOBIAN_COPIES
    n = max(config.sizes)
    per_fit = itemsize * copies * n * max(setup.fit_model.n_params, 1)
    need = 8 * batch * n * (dim + 1) + per_fit
    gib = 1024**3
    where = f"{device.type} memory ({available / gib:.1f} GiB{' available' if device.type == 'cpu' else ''})"
    budget = series["fit"]["options"].get("max_memory")
    if budget is not None and budget < per_fit:
        i = next(j for j, s in enumerate(config.series) if s["name"] == series["name"])
        raise ValueError(f"config key 'series[{i}].fit.options.max_memory': {budget} bytes is below the {per_fit} "
                         f"bytes one fit needs at n = {n} ({setup.fit_model.n_params} parameters)")
    if need > available:
        raise ValueError(f"config key 'sample.sizes': n = {n} needs at least {need / gib:.1f} GiB for one cell of "
                         f"series {series['name']!r} ({batch} data sets and one fit's Jacobian), more than the "
                         f"{where}")
    n_eval = int(config.data["losses"]["l2_n_eval"]) if config.data["losses"]["l2"] else 0
    need_l2 = 8 * n_eval * (dim + batch)  # the evaluation sample and the cell's fitted values on it
    if need_l2 > available:
        raise ValueError(f"config key 'losses.l2_n_eval': {n_eval} evaluation points need at least "
                         f"{need_l2 / gib:.1f} GiB for one cell, more than the {where}")


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _losses(model: MixtureModel, params: Params, setup: SeriesSetup, config: SweepConfig) -> dict[str, np.ndarray]:
    """Every configured loss per fit; fits with non-finite parameters get NaN (never scored)."""
    spec = config.data["losses"]
    batch = next(iter(params.values())).shape[0]
    finite = torch.ones(batch, dtype=torch.bool, device=next(iter(params.values())).device)
    for v in params.values():
        finite &= torch.isfinite(v.reshape(batch, -1)).all(-1)
    names = list(spec["kinds"]) + (["L2"] if spec["l2"] else [])
    out = {name: np.full(batch, np.nan) for name in names}
    idx = torch.nonzero(finite).flatten()
    if idx.numel() == 0:
        return out
    sub = {k: v[idx] for k, v in params.items()}
    sel = idx.cpu().numpy()
    if spec["kinds"]:
        d = voronoi_losses_for(model, sub, setup.score_model, setup.score_truth, kinds=spec["kinds"], r=spec["r"])
        for k, v in d.items():
            out[k][sel] = v.detach().to("cpu", torch.float64).numpy()
    if spec["l2"]:
        l2 = l2_error(model, sub, setup.score_truth, true_model=setup.score_model, n_eval=spec["l2_n_eval"],
                      seed=l2_seed(config.data["root_seed"]), x_dist=config.data["sample"]["x_dist"])
        out["L2"][sel] = l2.detach().to("cpu", torch.float64).numpy()
    return out


def _starts(setup: SeriesSetup, fit: dict[str, Any], n: int, seeds: list[list[int]], bounds: Bounds,
            dtype: torch.dtype) -> Params:
    """Every start of a cell, batch shape ``(b, m)`` (or ``(b,)`` for one start).

    Start ``s < n_starts`` follows ``fit.init`` (``near_truth``, ``random`` or ``paper``: the
    group's start, whose noise shrinks with ``n``); starts ``n_starts ...`` are random starts.
    Each start is drawn from its own seed, so a start does not depend on which cell holds it.
    """
    n_main = fit["n_starts"]

    def one(s: int, seed: int) -> Params:
        if s >= n_main or fit["init"] == "random":
            return init_random(setup.fit_model, batch_shape=(), bounds=bounds, seed=seed, dtype=dtype)
        if fit["init"] == "paper":
            return init_paper(setup.fit_model, setup.score_model, setup.score_truth, n, batch_shape=(), seed=seed,
                              noise=fit["paper_noise"], bounds=bounds, dtype=dtype)
        return init_near_truth(setup.fit_model, setup.score_model, setup.score_truth, batch_shape=(),
                               perturbation=fit["perturbation"], seed=seed, bounds=bounds, dtype=dtype)

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
        The cell to compute.

    Returns
    -------
    pandas.DataFrame
        Columns ``truth, series, structure, control, n, replication, chunk, data_seed``, one
        column per loss (the estimate: the start of least empirical risk), per loss ``L`` the
        smallest and largest loss over the near-optimal starts (``L_min``, ``L_max``,
        :func:`near_optimal`), ``n_starts`` and ``n_near_optimal``, and the estimator's
        certificate fields (with ``boundary_params``: the bounds the fit ends at, e.g.
        ``"a:hi,beta0:lo"``; ``start``: the index of the kept start).
    """
    config, series, setup = _cached_setup(json.dumps(config_dict, sort_keys=True), cell.series, cell.truth)
    fit = series["fit"]
    root = config.data["root_seed"]
    device = resolve_device(config.data["device"])
    dtype = resolve_dtype(config.data["dtype"])
    b, m = len(cell.reps), fit["n_starts"] + fit["random_starts"]
    noise = 0.0 if cell.control == "noise_free" else setup.noise_std
    with _torch_threads(config.data["threads"]):
        seeds = data_seeds(root, cell.truth, cell.n, cell.reps)
        X, y = sample_batch(setup.data_model, setup.data_truth, cell.n, noise, seeds,
                            x_dist=config.data["sample"]["x_dist"], device=device, dtype=dtype)
        bounds = _bounds(fit["bounds"])
        init = _starts(setup, fit, cell.n, start_seeds(root, cell.truth, cell.n, cell.reps, m), bounds, dtype)
        result = fit_batch(setup.fit_model, X, y, init, method=fit["method"], bounds=bounds, max_iter=fit["max_iter"],
                           tol=fit["tol"], device=device, dtype=dtype, truth=setup.score_truth,
                           seed=sgd_seeds(root, cell.truth, cell.n, cell.reps), **fit["options"])
        every = result.all_starts if result.all_starts is not None else result
        all_losses = {k: v.reshape(b, m) for k, v in _losses(setup.fit_model, every.params, setup, config).items()}
        scale = y.square().mean(-1).to("cpu", torch.float64).numpy()
    risk_all = every.risk.detach().to("cpu", torch.float64).numpy().reshape(b, m)
    best = result.start.cpu().numpy()
    near = near_optimal(risk_all, risk_all[np.arange(b), best], cell.n, fit["near_optimal_loglik"], scale)
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
    losses["n_starts"] = np.full(b, m, dtype=np.int64)
    losses["n_near_optimal"] = near.sum(1).astype(np.int64)
    frame = result.certificate_frame().drop(columns="fit")  # position in the batch: depends on the cut
    head = pd.DataFrame({
        "truth": np.full(b, cell.truth, dtype=np.int64),
        "series": cell.series,
        "structure": series.get("structure") or "",
        "control": cell.control,
        "n": np.full(b, cell.n, dtype=np.int64),
        "replication": np.asarray(cell.reps, dtype=np.int64),
        "chunk": np.full(b, cell.chunk, dtype=np.int64),
        "data_seed": np.asarray([seed_int(s) for s in seeds], dtype=np.int64),
    })
    loss_frame = pd.DataFrame(losses)
    frame = frame.drop(columns=[c for c in frame.columns if c in head.columns or c in loss_frame.columns])
    return pd.concat([head, loss_frame, frame], axis=1)


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` did.

    Attributes
    ----------
    run_dir : RunDir
        The output directory.
    fingerprint : str
        The configuration's fingerprint.
    n_cells, reused, computed : int
        Cells in the plan, verified cells found on disk, cells computed now.
    seconds : float
        Wall time of the call.
    results, rates, summary : pandas.DataFrame
        The tables written to ``results.parquet``, ``rates.csv`` and ``summary.csv``.
    """

    run_dir: RunDir
    fingerprint: str
    n_cells: int
    reused: int
    computed: int
    seconds: float
    results: pd.DataFrame = field(repr=False)
    rates: pd.DataFrame = field(repr=False)
    summary: pd.DataFrame = field(repr=False)


class SweepInterrupted(KeyboardInterrupt):
    """A sweep stopped by Ctrl-C (SIGINT) or SIGTERM; its finished cells are kept.

    Attributes
    ----------
    done, total, computed : int
        Cells on disk now, cells in the plan, cells computed by the interrupted call.
    signal_number : int
        ``signal.SIGINT`` or ``signal.SIGTERM``.
    """

    def __init__(self, done: int, total: int, computed: int, signal_number: int = signal.SIGINT) -> None:
        super().__init__(done, total, computed, signal_number)
        self.done, self.total, self.computed, self.signal_number = done, total, computed, signal_number

    def __str__(self) -> str:
        how = "terminated (SIGTERM)" if self.signal_number == signal.SIGTERM else "interrupted"
        return (f"{how}; {self.done} of {self.total} cells done ({self.computed} this run), "
                "rerun the same command to resume")


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanup runs as for Ctrl-C."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn the first SIGTERM into :class:`_Terminated` (main thread only; a second one kills)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise _Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_POLL_SECONDS)
    os._exit(1)


def _die_with_parent() -> None:
    """On Linux, ask the kernel to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def _worker_init(parent_pid: int) -> None:
    """Set up a worker process: Ctrl-C is the parent's business; never outlive the parent.

    The kernel kills the worker when its parent dies (Linux); elsewhere, and as a fallback, a
    daemon thread exits the worker once its parent pid changes.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="hmoe-sim-parent-watch",
                     daemon=True).start()


def _run_pair(config_dict: dict[str, Any], cell: Cell) -> tuple[Cell, pd.DataFrame]:
    return cell, run_cell(config_dict, cell)


def _inline_results(todo: list[Cell], config_dict: dict[str, Any]) -> Iterator[tuple[Cell, pd.DataFrame]]:
    for cell in todo:
        yield cell, run_cell(config_dict, cell)


def _stop_workers(executor: ProcessPoolExecutor) -> None:
    """Terminate the pool's worker processes now (running cells are abandoned) and reap them."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for p in processes:
        with contextlib.suppress(Exception):
            p.terminate()
    executor.shutdown(wait=True, cancel_futures=True)
    for p in processes:
        p.join(5)
        if p.is_alive():  # pragma: no cover - a worker ignoring SIGTERM
            p.kill()
            p.join(5)


def _process_results(todo: list[Cell], config_dict: dict[str, Any],
                     jobs: int) -> Iterator[tuple[Cell, pd.DataFrame]]:
    """Cells computed by ``jobs`` spawned worker processes, in order of completion.

    Closing the generator early (an exception in the caller, Ctrl-C, SIGTERM) terminates the
    workers and waits for them; a normal end shuts the pool down cleanly.
    """
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context,
                                   initializer=_worker_init, initargs=(os.getpid(),))
    finished = False
    try:
        pending: set[Future[tuple[Cell, pd.DataFrame]]] = {executor.submit(_run_pair, config_dict, c) for c in todo}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    yield future.result()
                except BrokenProcessPool as err:
                    raise RuntimeError("a worker process died while computing a cell (killed from outside, or out "
                                       "of memory?); finished cells are kept, rerun to resume") from err
        finished = True
    finally:
        if finished:
            executor.shutdown(wait=True)
        else:
            _stop_workers(executor)


def _check_dask(scheduler: str | None) -> None:
    """Fail early when dask.distributed is missing or the scheduler address cannot be reached."""
    try:
        import dask.distributed  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ValueError("backend 'dask' needs dask.distributed: pip install 'hmoe-sim[dist]'") from err
    if scheduler is None:
        return
    protocol, _, rest = scheduler.rpartition("://")
    if protocol not in ("", "tcp", "tls"):
        return
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"dask scheduler address {scheduler!r} is not of the form tcp://host:port")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    except OSError as err:
        raise ValueError(f"cannot reach the dask scheduler at {scheduler!r}: {err.strerror or err}") from err


def _dask_results(todo: list[Cell], config_dict: dict[str, Any], jobs: int, scheduler: str | None,
                  processes: bool) -> Iterator[tuple[Cell, pd.DataFrame]]:
    from dask.distributed import Client, LocalCluster
    from joblib import Parallel, delayed, parallel_config

    with contextlib.ExitStack() as stack:
        if scheduler is None:
            cluster = stack.enter_context(LocalCluster(n_workers=jobs, threads_per_worker=1, processes=processes,
                                                       dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(scheduler, timeout="20s"))
            except (OSError, TimeoutError) as err:
                raise ValueError(f"cannot connect to the dask scheduler at {scheduler!r}: {err}") from err
        with parallel_config(backend="dask", wait_for_workers_timeout=60):
            parallel = Parallel(return_as="generator_unordered")
            yield from parallel(delayed(_run_pair)(config_dict, c) for c in todo)
        del client


class _Progress:
    """Progress over the cells computed now: a tqdm bar, plain lines, or nothing."""

    def __init__(self, name: str, total: int, progress: bool | None, say: Callable[[str], None]) -> None:
        terminal = sys.stderr.isatty()
        self.bar_on = terminal if progress is None else progress
        self.lines_on = progress is None and not terminal
        self.name, self.total, self.say, self.done = name, total, say, 0
        self.start = self.last = time.monotonic()
        self.bar: Any = None
        if self.bar_on:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=name, unit="cell")

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        now = time.monotonic()
        if self.lines_on and (now - self.last >= PLAIN_PROGRESS_SECONDS or self.done == self.total):
            elapsed = now - self.start
            left = elapsed / self.done * (self.total - self.done)
            self.say(f"{self.name}: {self.done}/{self.total} cells computed, {elapsed:.0f} s elapsed, "
                     f"about {left:.0f} s left")
            self.last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_tables(run: RunDir, config: SweepConfig, results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``results.parquet`` and the tables derived from it; return ``(rates, summary)``.

    ``results`` holds one row per fit with the run fingerprint in its first column; the
    fingerprint is also stored in ``results.parquet``'s metadata and as a last column
    ``fingerprint`` of every derived table (:func:`derived_tables`; ``report`` and ``plot`` check each
    against ``config.resolved.json``, so a sweep killed between two of these files leaves a
    directory they refuse rather than tables that disagree). Besides ``rates.csv``, ``summary.csv`` and
    ``boundary.csv``, a truth ensemble with shared / non-shared pairs gets ``per_truth.csv``
    and ``ensemble.csv`` (:mod:`hmoe_sim.sweep.ensemble`).
    """
    run.write_results(results, config.fingerprint)
    tables = derived_tables(results, config)
    for name, table in tables.items():
        run.write_table(name, table, config.fingerprint)
    return tables[RATES_FILE], tables[SUMMARY_FILE]


def derived_tables(results: pd.DataFrame, config: SweepConfig) -> dict[str, pd.DataFrame]:
    """Every table computed from ``results``, by file name, in the order they are written.

    ``rates.csv``, ``summary.csv``, ``boundary.csv``, and for a truth ensemble with shared /
    non-shared pairs ``per_truth.csv`` and ``ensemble.csv``.
    """
    rates = rates_table(results, config)
    tables = {RATES_FILE: rates, SUMMARY_FILE: summary_table(results, config), BOUNDARY_FILE: boundary_table(results)}
    if len(config.truth_seeds) > 1 and structure_pairs(config):
        per_truth = per_truth_table(rates, config)
        tables[PER_TRUTH_FILE] = per_truth
        tables[ENSEMBLE_FILE] = ensemble_table(per_truth, config, results)
    return tables


def run_sweep(
    config: SweepConfig,
    out: str | Path,
    *,
    device: str | None = None,
    jobs: int = 1,
    backend: str = "local",
    scheduler: str | None = None,
    progress: bool | None = None,
    dask_processes: bool = True,
    log: Callable[[str], None] | None = None,
) -> SweepOutcome:
    """Run (or resume) a sweep and write its tables.

    Parameters
    ----------
    config : SweepConfig
        The validated configuration.
    out : str or Path
        Run directory; verified cells of the same cell hash found there are reused.
    device : str, optional
        Overrides ``config.device`` (part of the fingerprint: a fit on another device is
        another result).
    jobs : int
        Parallel cells (spawned worker processes for ``local``, workers of a new
        LocalCluster for ``dask``).
    backend : {"local", "dask"}
        In-process / a process pool, or a dask.distributed cluster through joblib.
    scheduler : str, optional
        Address of a running dask scheduler (``backend="dask"`` only); default: start a
        LocalCluster.
    progress : bool, optional
        ``True``: a tqdm bar over cells; ``False``: no progress output; default: the bar
        when stderr is a terminal, otherwise a plain line through ``log`` at most every
        :data:`PLAIN_PROGRESS_SECONDS` and after the last cell.
    dask_processes : bool
        Whether a LocalCluster uses worker processes (threads when ``False``).
    log : callable, optional
        Receives one-line messages (reuse counts, recomputed cells, progress lines);
        default prints to stderr.

    Returns
    -------
    SweepOutcome

    Raises
    ------
    ValueError
        Any bad argument, configuration or output directory, before anything is written.
    RunLocked
        Another sweep holds the run directory (a ``ValueError``).
    SweepInterrupted
        Ctrl-C or SIGTERM; the finished cells are on disk, and no worker process is left.
    """
    start = time.perf_counter()
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    if scheduler is not None and backend != "dask":
        raise ValueError(f"scheduler={scheduler!r} needs backend='dask'")
    if device is not None:
        config = config.with_overrides(device=device)
    check_estimator_options(config)
    if not str(out).strip():
        raise ValueError(f"--out {str(out)!r} is empty; give a run directory (use --out . for the current directory)")
    run = RunDir(out)
    run.check_writable()
    check_file_names(config, run)
    cells = plan_cells(config)
    run.check_layout([(c, cell_hash(config, c)) for c in cells])
    if backend == "dask":
        _check_dask(scheduler)

    fp = config.fingerprint
    counts = {"done": 0, "computed": 0}
    try:
        with _sigterm_raises(), run.lock(notify=say):
            run.write_config(config)
            frames, todo = _verified_cells(run, config, cells, say)
            counts["done"] = len(frames)
            reused = len(frames)
            say(f"sweep {config.name!r} (fingerprint {fp}): {len(cells)} cells, reusing {reused}, "
                f"computing {len(todo)}")
            if todo:
                _compute(run, config, todo, frames, counts, jobs=jobs, backend=backend, scheduler=scheduler,
                         dask_processes=dask_processes, progress=progress, say=say)
            results = pd.concat([frames[c] for c in cells], ignore_index=True)
            results = results.sort_values(["truth", "series", "control", "n", "replication"], kind="stable"
                                          ).reset_index(drop=True)
            results.insert(0, "fingerprint", fp)
            rates, summary = write_tables(run, config, results)
    except SweepInterrupted:
        raise
    except KeyboardInterrupt as err:
        number = signal.SIGTERM if isinstance(err, _Terminated) else signal.SIGINT
        raise SweepInterrupted(counts["done"], len(cells), counts["computed"], number) from err
    return SweepOutcome(run, fp, len(cells), reused, len(todo), time.perf_counter() - start, results, rates, summary)


def _verified_cells(run: RunDir, config: SweepConfig, cells: list[Cell],
                    say: Callable[[str], None]) -> tuple[dict[Cell, pd.DataFrame], list[Cell]]:
    """The stored cells that pass verification, and the cells to compute (missing or invalid)."""
    losses = loss_columns(config)
    frames: dict[Cell, pd.DataFrame] = {}
    todo: list[Cell] = []
    for cell in cells:
        try:
            frames[cell] = run.load_cell(cell, cell_hash(config, cell), losses)
        except FileNotFoundError:
            todo.append(cell)
        except CellInvalid as err:
            say(f"cell {cell.key}: stored file {err}; recomputing it")
            todo.append(cell)
    return frames, todo


def _compute(run: RunDir, config: SweepConfig, todo: list[Cell], frames: dict[Cell, pd.DataFrame],
             counts: dict[str, int], *, jobs: int, backend: str, scheduler: str | None, dask_processes: bool,
             progress: bool | None, say: Callable[[str], None]) -> None:
    """Compute ``todo``, write each cell as it arrives and add its verified frame to ``frames``."""
    config_dict = config.to_dict()
    losses = loss_columns(config)
    hashes = {c: cell_hash(config, c) for c in todo}
    if backend == "dask":
        stream = _dask_results(todo, config_dict, jobs, scheduler, dask_processes)
    elif jobs == 1 or len(todo) == 1:
        stream = _inline_results(todo, config_dict)
    else:
        stream = _process_results(todo, config_dict, jobs)
    bar = _Progress(config.name, len(todo), progress, say)
    try:
        with contextlib.closing(stream):
            for cell, frame in stream:
                run.write_cell(cell, hashes[cell], frame, config.fingerprint)
                frames[cell] = run.load_cell(cell, hashes[cell], losses)
                counts["done"] += 1
                counts["computed"] += 1
                bar.update()
    finally:
        bar.close()
