"""Where the cells of a sweep run: in-process, a pool of worker processes, or dask.

:class:`Execution` holds the execution choices of a sweep (``jobs``, ``backend``,
``scheduler``), none of which can change a number; :meth:`Execution.capped` keeps worker
processes x torch threads per cell within the cores this process may use, with a one-line
notice. :func:`cell_results` yields ``(cell, frame)`` pairs in order of completion: in-process
for one job (or one cell), from ``jobs`` spawned worker processes
(``concurrent.futures.ProcessPoolExecutor``) for several, or from a dask.distributed cluster
(one task per cell); workers take the cells largest first (:func:`largest_first`). A worker
process that dies, or a dask scheduler lost mid-run, raises :class:`WorkLost`.

Worker processes never outlive the sweep: they ignore Ctrl-C (the parent's business), are
killed by the kernel when their parent dies (Linux ``PR_SET_PDEATHSIG``; elsewhere each
worker checks twice a second that its parent is alive and exits when it is not), and closing
the iterator early (an exception, Ctrl-C or SIGTERM in the caller) terminates and reaps them.
A dask LocalCluster's workers are watched by their nannies, which exit when the sweep is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any

import pandas as pd

from hmoe_sim.sweep.cell import run_cell, usable_cores
from hmoe_sim.sweep.cells import Cell

__all__ = ["BACKENDS", "DASK_WORKERS_SECONDS", "ORPHAN_POLL_SECONDS", "SCHEDULER_LOST_SECONDS", "Execution",
           "WorkLost", "cell_results", "largest_first", "usable_cores"]

BACKENDS = ("local", "dask")
#: how long a dask client waits to connect to a scheduler, and for a lost one to come back
SCHEDULER_LOST_SECONDS = 20.0
#: how long a sweep waits for a dask scheduler to have a worker
DASK_WORKERS_SECONDS = 60.0


class WorkLost(RuntimeError):
    """Workers or the dask scheduler were lost mid-run (the message says which); finished cells are kept."""
#: how often a worker process checks that the sweep that started it is still alive
ORPHAN_POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Execution:
    """How a sweep's cells are spread: execution choices only, never part of a result.

    Attributes
    ----------
    jobs : int
        Cells computed at once (spawned worker processes for ``local``, workers of a new
        LocalCluster for ``dask``).
    backend : {"local", "dask"}
        In-process / a process pool, or a dask.distributed cluster (one task per cell).
    scheduler : str or None
        Address of a running dask scheduler (``backend="dask"`` only); ``None`` starts a
        LocalCluster.
    dask_processes : bool
        Whether a LocalCluster uses worker processes (threads when ``False``).

    Raises
    ------
    ValueError
        An unknown backend, ``jobs`` not a positive integer, or a scheduler without dask.
    """

    jobs: int = 1
    backend: str = "local"
    scheduler: str | None = None
    dask_processes: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {list(BACKENDS)}")
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise ValueError(f"jobs must be a positive integer, got {self.jobs!r}")
        if self.scheduler is not None and self.backend != "dask":
            raise ValueError(f"scheduler={self.scheduler!r} needs backend='dask'")

    def capped(self, threads: int, say: Callable[[str], None]) -> Execution:
        """This execution with at most ``usable_cores() // threads`` jobs (at least one).

        ``jobs`` cells at once, each running ``threads`` torch threads, would oversubscribe the
        cores this process may use (:func:`usable_cores`) when ``jobs * threads`` exceeds them;
        the jobs are then lowered and ``say`` gets one line saying so. A remote dask cluster
        (``scheduler`` given) brings its own cores and is left alone.
        """
        if self.scheduler is not None:
            return self
        cores = usable_cores()
        most = max(1, cores // threads)
        if self.jobs <= most:
            return self
        say(f"--jobs {self.jobs} x {threads} torch thread(s) per cell is more than the {cores} usable cores; "
            f"running {most} job(s) at a time")
        return dataclasses.replace(self, jobs=most)


def cell_results(todo: list[Cell], config_dict: dict[str, Any],
                 execution: Execution) -> Generator[tuple[Cell, pd.DataFrame], None, None]:
    """Compute the cells ``todo`` of a resolved configuration; yield ``(cell, frame)`` as each finishes.

    In-process (:func:`~hmoe_sim.sweep.cell.run_cell` in this process) for one job or one
    cell, else in ``execution.jobs`` spawned worker processes, or on dask
    (``execution.backend == "dask"``). Close the generator to stop early: workers are
    terminated and reaped.
    """
    if execution.backend == "dask":
        return _dask_results(todo, config_dict, execution.jobs, execution.scheduler, execution.dask_processes)
    if execution.jobs == 1 or len(todo) == 1:
        return _inline_results(todo, config_dict)
    return _process_results(todo, config_dict, execution.jobs)


def _exit_when_orphaned(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(ORPHAN_POLL_SECONDS)
    os._exit(1)


def _libc() -> ctypes.CDLL | None:
    """This process's C library (Linux), or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _die_with_parent() -> None:
    """On Linux, ask the kernel to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``)."""
    libc = _libc()
    if libc is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


#: a worker's glibc malloc serves arrays up to this size from its heap (not a fresh mmap each time)
#: and keeps up to ``WORKER_TRIM_BYTES`` of freed heap for reuse (not handed back to the kernel)
WORKER_MMAP_BYTES = 32 * 2**20
WORKER_TRIM_BYTES = 256 * 2**20


def _keep_freed_memory() -> bool:
    """Ask glibc's malloc (Linux) to reuse freed memory: the fits allocate and free arrays of a few MB
    many times per second, and by default each is a fresh ``mmap`` whose pages are faulted in anew
    (measured: 2.4 million page faults in a 48-cell sweep, 5 s of system time; 0.2 million with
    this). Affects this process only; ``False`` where it is not available."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not Linux, or not glibc
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, WORKER_MMAP_BYTES)) and bool(mallopt(m_trim_threshold, WORKER_TRIM_BYTES))


def _worker_init(parent_pid: int) -> None:
    """Set up a worker process: Ctrl-C is the parent's business; never outlive the parent; freed
    memory is reused (:func:`_keep_freed_memory`).

    The kernel kills the worker when its parent dies (Linux); elsewhere, and as a fallback, a
    daemon thread exits the worker once its parent pid changes.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _keep_freed_memory()
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before the request above took effect
        os._exit(1)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="hmoe-sim-parent-watch",
                     daemon=True).start()


def largest_first(todo: list[Cell]) -> list[Cell]:
    """``todo`` in the order workers take it: most samples (``n`` x replications) first, ties in the
    given order. Handing out the long cells first keeps the last cells short, so that no worker
    waits idle on another's long cell at the end (longest-processing-time-first scheduling); the
    order never changes a number."""
    return sorted(todo, key=lambda c: -c.n * len(c.reps))


def _run_pair(config_dict: dict[str, Any], cell: Cell) -> tuple[Cell, pd.DataFrame]:
    return cell, run_cell(config_dict, cell)


def _inline_results(todo: list[Cell],
                    config_dict: dict[str, Any]) -> Generator[tuple[Cell, pd.DataFrame], None, None]:
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
                     jobs: int) -> Generator[tuple[Cell, pd.DataFrame], None, None]:
    """Cells computed by ``jobs`` spawned worker processes, in order of completion.

    Closing the generator early (an exception in the caller, Ctrl-C, SIGTERM) terminates the
    workers and waits for them; a normal end shuts the pool down cleanly.
    """
    context = multiprocessing.get_context("spawn")
    executor = ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=context,
                                   initializer=_worker_init, initargs=(os.getpid(),))
    finished = False
    try:
        # submitted in this order, taken by the workers in this order
        futures = [executor.submit(_run_pair, config_dict, c) for c in largest_first(todo)]
        pending: set[Future[tuple[Cell, pd.DataFrame]]] = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    yield future.result()
                except BrokenProcessPool as err:
                    raise WorkLost("a worker process died while computing a cell (killed from outside, or out of "
                                   "memory?)") from err
        finished = True
    finally:
        if finished:
            executor.shutdown(wait=True)
        else:
            _stop_workers(executor)


def _dask_results(todo: list[Cell], config_dict: dict[str, Any], jobs: int, scheduler: str | None,
                  processes: bool) -> Generator[tuple[Cell, pd.DataFrame], None, None]:
    """Cells computed on a dask cluster (a new LocalCluster of ``jobs`` workers, or the one ``scheduler`` runs).

    Every cell is one task submitted to the cluster (largest first by priority), so the cells
    run on the cluster's workers whatever their number; results arrive in order of completion.
    A scheduler lost mid-run (its tasks are cancelled by the client) and a task whose workers
    kept dying (``KilledWorker``) raise :class:`WorkLost`; dask's own log lines about the lost
    connection are silenced while the client closes.
    """
    from concurrent.futures import CancelledError

    from dask.distributed import Client, KilledWorker, LocalCluster, as_completed

    where = f"the dask scheduler at {scheduler!r}" if scheduler is not None else "the local dask cluster"
    with contextlib.ExitStack() as stack:
        if scheduler is None:
            cluster = stack.enter_context(LocalCluster(n_workers=jobs, threads_per_worker=1, processes=processes,
                                                       dashboard_address=None))
            client = stack.enter_context(Client(cluster, set_as_default=False))
        else:
            try:
                client = stack.enter_context(Client(scheduler, timeout=SCHEDULER_LOST_SECONDS, set_as_default=False))
            except (OSError, TimeoutError) as err:
                raise ValueError(f"cannot connect to the dask scheduler at {scheduler!r}: {err}") from err
        try:
            client.wait_for_workers(1, timeout=DASK_WORKERS_SECONDS)
        except TimeoutError as err:
            raise WorkLost(f"{where} has no worker after {DASK_WORKERS_SECONDS:g} s (start some: dask worker "
                           f"{scheduler or 'ADDRESS'})") from err
        order = largest_first(todo)
        futures = {client.submit(_run_pair, config_dict, cell, pure=False, priority=len(order) - i): cell
                   for i, cell in enumerate(order)}
        try:
            for future in as_completed(list(futures), loop=client.loop):
                try:
                    pair = future.result()
                except KilledWorker as err:
                    raise WorkLost("dask workers died repeatedly while computing cell "
                                   f"{futures[future].key} (killed from outside, or out of memory?)") from err
                except CancelledError as err:
                    if client.status == "running":
                        raise
                    stack.enter_context(_quiet_loggers("distributed"))  # the client's reconnection noise
                    raise WorkLost(f"lost {where}") from err
                yield pair
        finally:
            if client.status == "running":
                with contextlib.suppress(Exception):
                    client.cancel(list(futures), force=True)


@contextlib.contextmanager
def _quiet_loggers(prefix: str) -> Iterator[None]:
    """Silence the loggers named ``prefix`` and below (each has its own level) for the ``with`` block."""
    import logging

    names = [n for n in list(logging.root.manager.loggerDict) if n == prefix or n.startswith(prefix + ".")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
