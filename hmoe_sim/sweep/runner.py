"""Run a sweep: checks, the run directory's lock, the cells, the tables; signals and progress.

Order of work in :func:`run_sweep`: every check first (arguments, configuration, estimator
options, memory, the output directory, the dask scheduler: :mod:`~hmoe_sim.sweep.checks`),
then the run directory's lock, then ``config.resolved.json``, then the cells
(:func:`~hmoe_sim.sweep.backends.cell_results`; one cell is
:func:`~hmoe_sim.sweep.cell.run_cell`), then the tables
(:func:`~hmoe_sim.sweep.tables.write_tables`). Finished cells are written by the calling
process, each atomically, as they arrive; a rerun verifies the stored cells and computes only
the missing or invalid ones (see :mod:`hmoe_sim.sweep.storage`). Results never depend on the
backend or the number of jobs (identical bit for bit on the CPU).

Stopping a sweep. Ctrl-C (SIGINT) or SIGTERM stops the worker processes, keeps every
finished cell and raises :class:`SweepInterrupted` ("interrupted; N of M cells done, rerun
the same command to resume"); no child process outlives the sweep
(:mod:`~hmoe_sim.sweep.backends`). SIGKILL cannot be caught: the kernel releases the lock and
kills the worker processes with their parent, and the pool's resource tracker exits once they
are gone. A worker process killed from outside (or by the kernel for memory), or a dask
scheduler lost mid-run, ends the sweep with :class:`SweepAborted` (one line: what was lost,
the cells kept, how to resume). The next sweep into the directory takes over the stale lock with a notice and
removes the partial temporary files the killed one may have left.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from hmoe_sim.sweep.backends import Execution, WorkLost, cell_results, usable_cores
from hmoe_sim.sweep.cells import Cell, cell_hash
from hmoe_sim.sweep.checks import check_before_work
from hmoe_sim.sweep.config import SweepConfig
from hmoe_sim.sweep.report import loss_columns
from hmoe_sim.sweep.storage import CellInvalid, RunDir, with_noise_columns
from hmoe_sim.sweep.tables import write_tables

__all__ = ["PLAIN_PROGRESS_SECONDS", "SweepAborted", "SweepInterrupted", "SweepOutcome", "run_sweep"]

#: without a terminal, a plain progress line at most this often (and after the last cell)
PLAIN_PROGRESS_SECONDS = 30.0


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


class SweepAborted(RuntimeError):
    """A sweep stopped because its workers or its dask scheduler were lost; its finished cells are kept.

    Attributes
    ----------
    reason : str
        What was lost (from :class:`~hmoe_sim.sweep.backends.WorkLost`).
    done, total, computed : int
        Cells on disk now, cells in the plan, cells computed by the stopped call.
    """

    def __init__(self, reason: str, done: int, total: int, computed: int) -> None:
        super().__init__(reason, done, total, computed)
        self.reason, self.done, self.total, self.computed = reason, done, total, computed

    def __str__(self) -> str:
        return (f"{self.reason}; {self.done} of {self.total} cells done ({self.computed} this run) are kept, "
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
        LocalCluster for ``dask``); at most the usable cores over ``config.threads``, lowered
        with a one-line notice (:meth:`~hmoe_sim.sweep.backends.Execution.capped`).
    backend : {"local", "dask"}
        In-process / a process pool, or a dask.distributed cluster (one task per cell).
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
    SweepAborted
        A worker process died, or the dask scheduler was lost; the finished cells are on disk.
    """
    start = time.perf_counter()
    say = log if log is not None else (lambda msg: print(msg, file=sys.stderr))
    execution = Execution(jobs, backend, scheduler, dask_processes)
    if device is not None:
        config = config.with_overrides(device=device)
    run, cells = check_before_work(config, out, dask=backend == "dask", scheduler=scheduler)
    threads = config.threads
    if execution.scheduler is None and threads > usable_cores():  # a remote cluster's workers cap their own
        threads = usable_cores()
        say(f"threads = {config.threads} is more than the {threads} usable cores; each cell runs {threads} torch "
            "thread(s)")
    execution = execution.capped(threads, say)

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
                _compute(run, config, todo, frames, counts, execution, progress=progress, say=say)
            results = with_noise_columns(pd.concat([frames[c] for c in cells], ignore_index=True), config)
            results = results.sort_values(["truth", "series", "control", "n", "noise_std", "replication"],
                                          kind="stable").reset_index(drop=True)
            results.insert(0, "fingerprint", fp)
            rates, summary = write_tables(run, config, results)
    except SweepInterrupted:
        raise
    except WorkLost as err:
        raise SweepAborted(str(err), counts["done"], len(cells), counts["computed"]) from err
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
             counts: dict[str, int], execution: Execution, *, progress: bool | None,
             say: Callable[[str], None]) -> None:
    """Compute ``todo``, write each cell as it arrives and add its verified frame to ``frames``."""
    losses = loss_columns(config)
    hashes = {c: cell_hash(config, c) for c in todo}
    stream = cell_results(todo, config.to_dict(), execution)
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
