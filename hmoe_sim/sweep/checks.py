"""Every check a sweep runs before any work: configuration, estimator options, memory, files, dask.

:func:`check_before_work` runs them in order -- the estimator settings of every series
(:func:`check_estimator_options`, with the memory check :func:`check_memory` and the
identifiability check), the output directory (writable, file names short enough
(:func:`check_file_names`), a layout of this plan), and the dask scheduler -- and raises a
one-line ``ValueError`` naming the bad key or value before anything is written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
from pathlib import Path

import torch

from hmoe_sim.devices import cpu_available_memory, resolve_device, resolve_dtype
from hmoe_sim.estimators import fit_batch, jacobian_bytes
from hmoe_sim.files import TEMPORARY_NAME_EXTRA
from hmoe_sim.identifiability import nonidentifiable_reason
from hmoe_sim.models.presets import preset_defaults, tensor_elements
from hmoe_sim.sweep.cells import Cell, cell_hash, plan_cells
from hmoe_sim.sweep.config import SeriesConfig, SweepConfig
from hmoe_sim.sweep.setup import SeriesSetup, fit_bounds, series_setup
from hmoe_sim.sweep.storage import RunDir

__all__ = ["check_before_work", "check_dask", "check_estimator_options", "check_file_names", "check_memory",
           "cpu_available_memory", "SCHEDULER_CHECK_SECONDS"]


def check_before_work(config: SweepConfig, out: str | Path, *, dask: bool = False,
                      scheduler: str | None = None) -> tuple[RunDir, list[Cell]]:
    """Run every check of a sweep of ``config`` into ``out``; return the run directory and the plan.

    In order: :func:`check_estimator_options`; ``out`` non-empty and writable;
    :func:`check_file_names`; the directory's layout for this plan (``RunDir.check_layout``);
    and for the dask backend (``dask=True``) :func:`check_dask`. Nothing is written.

    Raises
    ------
    ValueError
        The first failed check, in one line naming the key or value.
    """
    check_estimator_options(config)
    if not str(out).strip():
        raise ValueError(f"--out {str(out)!r} is empty; give a run directory (use --out . for the current directory)")
    run = RunDir(out)
    run.check_writable()
    check_file_names(config, run)
    cells = plan_cells(config)
    run.check_layout([(c, cell_hash(config, c)) for c in cells], run.figure_path(config.name).name)
    if dask:
        check_dask(scheduler)
    return run, cells


def check_estimator_options(config: SweepConfig) -> None:
    """Validate every series' estimator settings before any fitting.

    Checks ``fit.bounds`` (its keys are checked by :func:`~hmoe_sim.sweep.config.parse_config`;
    here: the names must be parameters of the fitted model) and ``fit.options`` (extra keyword
    arguments of ``fit_batch`` / ``fit_multistart``), that the device exists, that one cell can fit
    in the device's memory (:func:`check_memory`), and that every series' truth is
    identifiable at its true size (:func:`hmoe_sim.identifiability.nonidentifiable_reason`,
    checked on the series' first truth seed) unless ``allow_nonidentifiable = true``.

    Raises
    ------
    ValueError
        Naming the offending key.
    """
    resolve_device(config.device)
    reserved = {"model", "X", "y", "init", "method", "bounds", "max_iter", "tol", "device", "dtype", "truth", "seed",
                "show_progress", "mask"}
    for i, s in enumerate(config.series):
        key = f"series[{i}].fit"
        setup = series_setup(config, s, s.truth_seeds[0])
        try:
            bounds = fit_bounds(s.fit.bounds)
            bounds.check_names(setup.fit_model)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config key {key + '.bounds'!r}: {err}") from err
        accepted = set(inspect.signature(fit_batch).parameters) - reserved
        bad = sorted(set(s.fit.options) - accepted)
        if bad:
            raise ValueError(f"unknown config key(s) {[f'{key}.options.{b}' for b in bad]}; "
                             f"fit_batch accepts {sorted(accepted)}")
        check_memory(config, s, setup)
        if not config.allow_nonidentifiable:
            reason = nonidentifiable_reason(s.preset, s.truth_options, seed=s.truth_seeds[0])
            if reason is not None:
                raise ValueError(f"series[{i}] ({s.name!r}, preset {s.preset!r}) is not identifiable at its "
                                 f"true size: {reason}; a rate measured on it is not a rate of its parameters. "
                                 "Set allow_nonidentifiable = true to run it anyway")


def _device_memory(device: torch.device) -> int:
    """Memory of ``device`` in bytes: total for a GPU, available to this process for the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return cpu_available_memory()




def check_file_names(config: SweepConfig, run: RunDir) -> None:
    """Raise when a cell file or the figure of ``config`` would have too long a file name.

    Checked on the longest cell key of every series (largest truth seed, control, ``n``, noise
    level and block) with its hash and the temporary-file suffix, and on ``<name>.png``, against the
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
    blocks = -(-config.replications // config.sample.chunk)
    sigma = max(config.noise_levels, key=lambda v: len(repr(v)), default=None)  # the longest noise level in a key
    for i, s in enumerate(config.series):
        for control in ["", *config.controls, *config.control_perturbations]:
            cell = Cell(max(s.truth_seeds), s.name, control, max(config.sizes), blocks - 1, (),
                        None if control else sigma)
            length = len(run.cell_path(cell, "0" * 16).name.encode()) + TEMPORARY_NAME_EXTRA
            if length > limit:
                raise ValueError(f"config key 'series[{i}].name': {s.name!r} makes cell file names of {length} "
                                 f"characters, more than the {limit} a file name may have; shorten it")
    for part in f"{config.name}.png".split("/"):
        if len(part.encode()) + TEMPORARY_NAME_EXTRA > limit:
            raise ValueError(f"config key 'name': {config.name!r} makes a figure file name of "
                             f"{len(part.encode())} characters, too long for a file name (limit {limit}); shorten it")


def check_memory(config: SweepConfig, series: SeriesConfig, setup: SeriesSetup) -> None:
    """Raise when one cell of ``series`` plainly cannot fit in the device's memory.

    A lower bound of what one cell needs at the largest ``n``: its data (``min(sample.chunk,
    replications)`` data sets of ``n * (D + 1)`` float64 numbers, drawn at once) plus the
    Jacobian work of a single fit (:func:`~hmoe_sim.estimators.jacobian_bytes`, what
    :func:`~hmoe_sim.estimators.auto_chunk_size` budgets); separately, the L2 evaluation sample of the
    cell (the points and the fitted values there); the widest tensor of one evaluation (the
    attention's keys of the HMoE presets, :func:`~hmoe_sim.models.presets.tensor_elements`);
    and the state of every start of a cell, fitted at once (``fit.n_starts + fit.random_starts``
    per data set: four copies of the parameters at least). Each is compared with the device's total
    memory (for the CPU: the memory available to this process, :func:`cpu_available_memory`),
    so only a configuration that cannot run on this machine now is refused. A
    ``fit.options.max_memory`` below what one fit's Jacobian needs at the largest ``n`` is
    refused too.

    Raises
    ------
    ValueError
        Naming ``sample.sizes`` (or ``losses.l2_n_eval``, the preset option that sets the attention's
        width, ``fit.random_starts`` / ``fit.n_starts``), the value and the memory needed.
    """
    device = resolve_device(config.device)
    available = _device_memory(device)
    batch = min(config.sample.chunk, config.replications)
    dim = setup.fit_model.input_dim
    n = max(config.sizes)
    dtype = resolve_dtype(config.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n_params = setup.fit_model.n_params
    per_fit = jacobian_bytes(n, n_params, dtype, analytic=hasattr(setup.fit_model, "value_and_jacobian"))
    need = 8 * batch * n * (dim + 1) + per_fit
    gib = 1024**3
    where = f"{device.type} memory ({available / gib:.1f} GiB{' available' if device.type == 'cpu' else ''})"
    i = next(j for j, s in enumerate(config.series) if s.name == series.name)
    budget = series.fit.options.get("max_memory")
    if budget is not None and budget < per_fit:
        raise ValueError(f"config key 'series[{i}].fit.options.max_memory': {budget} bytes is below the {per_fit} "
                         f"bytes one fit needs at n = {n} ({n_params} parameters)")
    # the attention's keys of one evaluation at the largest n (the HMoE presets' widest tensor)
    _, per_sample, option = tensor_elements(series.preset, **series.truth_options)
    forward = itemsize * n * per_sample
    if option is not None and forward > need and need + forward > available:  # the attention, not n, is too wide
        value = {**preset_defaults(series.preset), **series.truth_options}[option]
        shared = config.truth.preset == series.preset and config.truth.options.get(option) == value
        key = f"truth.options.{option}" if shared else f"series[{i}].truth_options.{option}"
        raise ValueError(f"config key '{key}': {option} = {value} makes one evaluation of series {series.name!r} "
                         f"at n = {n} hold {n * per_sample} numbers ({forward / gib:.1f} GiB), more than the {where}")
    # every start of a cell is fitted at once: at least its start, estimate, trial step and kept result
    starts = series.fit.n_starts + series.fit.random_starts
    state = itemsize * batch * starts * 4 * n_params
    total = need + forward + state
    if state > need + forward and total > available:  # the starts, not n, are too many
        name = "random_starts" if series.fit.random_starts >= series.fit.n_starts else "n_starts"
        value = getattr(series.fit, name)
        key = f"fit.{name}" if all(getattr(s.fit, name) == value for s in config.series) else \
            f"series[{i}].fit.{name}"
        raise ValueError(f"config key '{key}': {value} makes {starts} starts per fit, {batch * starts} fitted at once "
                         f"in one cell of series {series.name!r}, which need at least {total / gib:.1f} GiB, more "
                         f"than the {where}")
    if total > available:
        raise ValueError(f"config key 'sample.sizes': n = {n} needs at least {total / gib:.1f} GiB for one cell of "
                         f"series {series.name!r} ({batch} data sets, one fit's Jacobian and evaluation, the starts), "
                         f"more than the {where}")
    n_eval = config.losses.l2_n_eval if config.losses.l2 else 0
    need_l2 = 8 * n_eval * (dim + batch)  # the evaluation sample and the cell's fitted values on it
    if need_l2 > available:
        raise ValueError(f"config key 'losses.l2_n_eval': {n_eval} evaluation points need at least "
                         f"{need_l2 / gib:.1f} GiB for one cell, more than the {where}")


#: seconds the dask scheduler check waits for a connection and for each reply
SCHEDULER_CHECK_SECONDS = 5.0


def check_dask(scheduler: str | None, timeout: float | None = None) -> None:
    """Fail early unless dask.distributed is installed and ``scheduler`` is a dask scheduler that answers.

    Connects with distributed's own comm layer (``distributed.comm.connect``, which performs
    the protocol's handshake) and asks the peer who it is (the ``identity`` call), all within
    ``timeout`` seconds (default :data:`SCHEDULER_CHECK_SECONDS`): a port that accepts and never
    answers, a service that speaks another protocol, a dask worker, an unknown address scheme
    or an unreachable address each fail in one line naming the address. Nothing is written.

    Raises
    ------
    ValueError
        dask is not installed, or ``scheduler`` is malformed, unreachable, silent, or not a
        dask scheduler (named).
    """
    try:
        import dask.distributed  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise ValueError("backend 'dask' needs dask.distributed: pip install 'hmoe-sim[dist]'") from err
    if scheduler is None:
        return
    seconds = SCHEDULER_CHECK_SECONDS if timeout is None else timeout
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hmoe-sim-dask-check") as pool:
        # a thread of its own: asyncio.run needs a thread without a running event loop
        problem = pool.submit(asyncio.run, _ask_identity(scheduler, seconds)).result()
    if problem is not None:
        raise ValueError(f"{problem}; check --scheduler (e.g. tcp://host:8786) and that a dask scheduler runs there")


async def _ask_identity(address: str, seconds: float) -> str | None:
    """What is wrong with the dask scheduler at ``address``, in words naming it (``None``: nothing)."""
    from distributed.comm import connect
    from distributed.core import send_recv

    comm = None
    try:
        try:
            # connect retries refused connections for ``seconds``, then reads the handshake without a limit
            comm = await asyncio.wait_for(connect(address, timeout=seconds), 2 * seconds)
        except (ValueError, TypeError) as err:
            return f"dask scheduler address {address!r} is not a dask address ({_first_line(err)})"
        except TimeoutError:  # an OSError: the handshake got no answer
            raise
        except OSError as err:
            return f"cannot reach the dask scheduler at {address!r} ({_first_line(err)})"
        identity = await asyncio.wait_for(send_recv(comm, op="identity"), seconds)
    except TimeoutError:
        return (f"the service at {address!r} accepts connections but gave no dask answer within "
                f"{2 * seconds:g} s")
    except Exception:  # noqa: BLE001 - another protocol's bytes fail anywhere in dask's decoder (MemoryError too)
        return f"the service at {address!r} does not speak the dask protocol (its first bytes are no dask message)"
    finally:
        if comm is not None:
            comm.abort()
    kind = identity.get("type") if isinstance(identity, dict) else None
    if kind != "Scheduler":
        return f"the service at {address!r} is not a dask scheduler (it says it is {kind!r})"
    return None


def _first_line(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return " ".join(text.split())[:200]
