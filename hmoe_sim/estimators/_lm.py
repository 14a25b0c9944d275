"""Batched projected Levenberg-Marquardt with per-problem damping (private).

Every problem ``b`` keeps its own damping ``lambda_b``, its own acceptance test and its
own stopping rule; a problem that has stopped is removed from the stack, so the answer of
one problem never depends on the others. Bounds are handled by projection: coordinates at
a bound whose descent direction points outward are frozen for the step (their row and
column of the damped normal matrix replaced by the identity), the step is solved for the
others and the candidate is clipped into the box (a projected Levenberg-Marquardt method
in the spirit of Kanzow, Yamashita and Fukushima, 2004).

Several solvers (threads) can work through one stack: they share a :class:`RowQueue` of the
problems not yet started and one output, and each keeps at most ``stack`` problems active,
taking the next ones from the queue as its own stop (:func:`solve_lm`). Once the queue is empty,
a solver with at least two problems fewer than another is handed some of the other's active
problems (the slow problems of a stack are not known in advance).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from hmoe_sim.estimators._core import Problem, SolverOutput, gradient_small, rows_where, stop_code, take_rows
from hmoe_sim.estimators._lm_scheme import LMScheme, default_scheme, geodesic_acceleration, resolution_test

__all__ = ["MIN_SAMPLES_PER_WORKER", "THREAD_STACK_SPLIT", "RowQueue", "solve_lm", "solve_lm_in_threads",
           "start_output", "worker_threads"]

_LAMBDA_MAX = 1e20
#: the damping never falls below this (``delayed`` update: a damping that underflowed to zero could
#: not grow again by doubling)
_LAMBDA_MIN = 1e-12
class RowQueue:
    """The problems ``0 .. total-1`` of a stack shared by ``solvers`` solvers (thread-safe).

    The problems not yet started are handed out in order (:meth:`take`). Once they run out, the
    solvers balance their active problems (:meth:`balance`, :meth:`wait_for_problems`): a solver
    with at least two fewer than another asks, and the other hands it half the difference. A
    problem's answer does not depend on the stack it is solved in, so moving it changes no result.
    """

    def __init__(self, total: int, solvers: int = 1) -> None:
        self._next, self._total = 0, total
        self._lock = threading.Condition()
        self._active = [0] * solvers            # active problems per solver (each writes its own)
        self._handed: list[list[_Active]] = [[] for _ in range(solvers)]
        self._asking: int | None = None          # the solver asking for problems, if any
        self._closed = False

    def take(self, count: int) -> range:
        """The next ``count`` problems (fewer, or none, when the queue runs out)."""
        with self._lock:
            start = self._next
            self._next = min(self._total, start + max(count, 0))
            return range(start, self._next)

    def balance(self, solver: int, act: _Active, problem: Problem) -> _Active:
        """``act`` of ``solver`` after balancing: problems handed to it joined, half the difference
        handed to an asking solver with at least two fewer, or a request made when another has at
        least two more. Cheap when there is nothing to do (no lock)."""
        count = act.rows.numel()
        self._active[solver] = count
        if len(self._active) == 1:
            return act
        if self._handed[solver]:
            with self._lock:
                received, self._handed[solver] = self._handed[solver], []
            act = _joined([act, *received], problem)
            self._active[solver] = act.rows.numel()
            return act
        asking = self._asking
        if asking is not None and asking != solver and count >= self._active[asking] + 2:
            with self._lock:
                if self._asking != asking or count < self._active[asking] + 2:
                    return act
                given = (count - self._active[asking]) // 2
                index = torch.arange(count, device=act.rows.device)
                self._handed[asking].append(act.keep(index[count - given :]))
                self._active[asking] += given
                self._active[solver] = count - given
                self._asking = None
                self._lock.notify_all()
            return act.keep(index[: count - given])
        if asking is None and count + 2 <= max(self._active):
            with self._lock:
                if self._asking is None:
                    self._asking = solver
        elif asking == solver and count + 2 > max(self._active):
            with self._lock:  # balanced meanwhile: let another ask
                if self._asking == solver:
                    self._asking = None
        return act

    def wait_for_problems(self, solver: int, problem: Problem) -> _Active | None:
        """Problems handed to ``solver``, which has none left, or ``None`` once no other solver has
        two or more (nothing will be handed over) or the stack was :meth:`close` d."""
        with self._lock:
            self._active[solver] = 0
            while True:
                if self._handed[solver]:
                    received, self._handed[solver] = self._handed[solver], []
                    act = _joined(received, problem)
                    self._active[solver] = act.rows.numel()
                    return act
                if self._closed or max(self._active) <= 1:
                    if self._asking == solver:
                        self._asking = None
                    self._lock.notify_all()
                    return None
                if self._asking is None:
                    self._asking = solver
                self._lock.wait(0.01)  # the others' counts change without a notice

    def close(self) -> None:
        """Stop every wait (a solver failed: the others must not wait for its problems)."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()


def _joined(parts: list[_Active], problem: Problem) -> _Active:
    """The active problems of ``parts`` as one state (in order)."""
    act = parts[0]
    for other in parts[1:]:
        act = act.join(other, problem)
    return act


def start_output(theta0: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> SolverOutput:
    """The output of problems not yet solved: the starts clipped into the box, no iterations,
    neither converged nor diverged (what :func:`solve_lm` fills in, problem by problem)."""
    B = theta0.shape[0]
    flags = torch.zeros(B, dtype=torch.bool, device=theta0.device)
    return SolverOutput(theta=torch.minimum(torch.maximum(theta0, lo), hi).clone(),
                        n_iter=torch.zeros(B, dtype=torch.long, device=theta0.device),
                        rel_change=torch.full((B,), float("nan"), dtype=theta0.dtype, device=theta0.device),
                        converged=flags, diverged=flags.clone(),
                        stop=torch.full((B,), stop_code("max_iter"), dtype=torch.long, device=theta0.device))


@dataclass
class _Active:
    """The state of the active problems (rows ``rows`` of the whole stack), compact."""

    rows: torch.Tensor
    sub: Problem
    theta: torch.Tensor
    cost: torch.Tensor
    A: torch.Tensor
    g: torch.Tensor
    scale: torch.Tensor
    lam: torch.Tensor
    nu: torch.Tensor
    steps: torch.Tensor
    rel: torch.Tensor

    _STATE = ("theta", "cost", "A", "g", "scale", "lam", "nu", "steps", "rel")

    def keep(self, index: torch.Tensor) -> _Active:
        return _Active(self.rows[index], self.sub.take(index), *(getattr(self, k)[index] for k in self._STATE))

    def join(self, other: _Active, problem: Problem) -> _Active:
        rows = torch.cat([self.rows, other.rows])
        return _Active(rows, problem.take(rows),
                       *(torch.cat([getattr(self, k), getattr(other, k)]) for k in self._STATE))


def solve_lm(
    problem: Problem,
    theta0: torch.Tensor,
    *,
    max_iter: int,
    ftol: float,
    xtol: float,
    gtol: float,
    damping: float = 1e-3,
    queue: RowQueue | None = None,
    stack: int | None = None,
    out: SolverOutput | None = None,
    solver: int = 0,
    scheme: LMScheme | None = None,
) -> SolverOutput:
    """Minimise ``0.5 * ||w_b (y_b - f(theta_b; X_b))||^2`` for every problem ``b``.

    The step and the damping update are those of ``scheme`` (:class:`LMScheme`: geodesic acceleration
    and delayed gratification by default). Stopping rules (per problem; ``SolverOutput.stop`` says which
    fired): the strict tests, as in MINPACK / ``scipy.optimize.least_squares``,
    ``ftol``: an accepted step with gain ratio above 1/4 lowered the cost by less than
    ``ftol * cost``; ``xtol``: a step shorter than ``xtol * (xtol + ||theta||)``;
    ``gtol``: the sup-norm of the projected gradient of the empirical risk ``RSS/n`` is at
    most ``gtol * RSS/n``; or the cost is exactly zero; and the statistical one,
    :func:`resolution_test` (no unit move lowers the risk by more than about ``scheme.resolution`` of the
    near-optimal margin, to the Gauss-Newton model), after an accepted step. Damping above ``1e20`` stops the problem
    as not converged, and so does the ``max_iter``-th iteration of a problem.

    Work per iteration: one linearisation of the active problems at their candidates
    (residuals and the per-atom Jacobian blocks, :meth:`Problem.linearize`), and the normal
    equations of the accepted ones only, from that same linearisation. The state of the active
    problems is gathered anew only when a problem leaves or joins.

    Parameters
    ----------
    queue, stack, out, solver : optional
        Several calls (threads) that share a ``queue`` of ``problem``'s rows and an ``out``
        (:func:`start_output`; each call writes only the rows it solves) work through one stack,
        each with at most ``stack`` active problems, taking the next rows from the queue as its
        own stop; once the queue is empty they balance their active problems (:class:`RowQueue`;
        ``solver``: this call's number, ``0 .. solvers-1``). Default: all rows at once, a new output.
    scheme : LMScheme, optional
        The step and the statistical stopping rule (default ``_lm_scheme.DEFAULT_SCHEME``, read at the call).

    Returns
    -------
    SolverOutput
        ``rel_change`` is the relative cost reduction of the last accepted step.
    """
    B, P = theta0.shape
    lo, hi = problem.lo, problem.hi
    scheme = default_scheme() if scheme is None else scheme
    out = start_output(theta0, lo, hi) if out is None else out
    queue = RowQueue(B) if queue is None else queue
    stack = B if stack is None else stack
    eye = torch.eye(P, dtype=theta0.dtype, device=theta0.device)
    tiny = torch.finfo(theta0.dtype).tiny
    eps = torch.finfo(theta0.dtype).eps
    act: _Active | None = None
    while True:
        size = 0 if act is None else act.rows.numel()
        new = queue.take(stack - size) if size < stack else range(0)
        if len(new):
            joining = _start(problem, new, out, damping, gtol)
            if joining is not None:
                act = joining if act is None or not act.rows.numel() else act.join(joining, problem)
        if act is None or not act.rows.numel():
            if len(new):
                continue
            act = queue.wait_for_problems(solver, problem)
            if act is None:
                return out
        else:
            act = queue.balance(solver, act, problem)
        act = _iterate(act, out, eye, tiny, eps, lo, hi, max_iter, ftol, xtol, gtol, scheme)


def _start(problem: Problem, new: range, out: SolverOutput, damping: float, gtol: float) -> _Active | None:
    """Linearise the problems ``new`` at their starts; write out those that are done already
    (diverged, or converged at the start) and return the state of the others."""
    lo, hi = problem.lo, problem.hi
    whole = new.start == 0 and new.stop == out.theta.shape[0]
    rows = torch.arange(new.start, new.stop, device=out.theta.device)
    sub = problem if whole else problem.take(rows)
    theta = out.theta[rows]
    lin = sub.linearize(theta)
    cost = 0.5 * lin.r.square().sum(-1)
    A, g = lin.normal_equations()
    del lin
    finite = torch.isfinite(cost) & torch.isfinite(A).flatten(1).all(-1) & torch.isfinite(g).all(-1)
    converged = finite & ((cost == 0) | _grad_test(g, theta, sub.n_eff, lo, hi, cost, gtol))
    out.diverged[rows] = ~finite
    out.converged[rows] = converged
    out.stop[rows] = torch.where(~finite, stop_code("diverged"),
                                 torch.where(cost == 0, stop_code("zero_risk"),
                                             torch.where(converged, stop_code("gtol"), stop_code("max_iter"))))
    keep = rows_where(finite & ~converged)
    if keep is not None and not keep.numel():
        return None
    count = rows.numel() if keep is None else keep.numel()
    lam = torch.full((count,), damping, dtype=theta.dtype, device=theta.device)
    return _Active(take_rows(keep, rows), sub.take(keep), take_rows(keep, theta), take_rows(keep, cost),
                   take_rows(keep, A), take_rows(keep, g),
                   torch.diagonal(take_rows(keep, A), dim1=-2, dim2=-1).clone(), lam,
                   torch.full_like(lam, 2.0), torch.zeros(count, dtype=torch.long, device=theta.device),
                   torch.full_like(lam, float("nan")))


def _iterate(act: _Active, out: SolverOutput, eye: torch.Tensor, tiny: float, eps: float,
             lo: torch.Tensor, hi: torch.Tensor, max_iter: int, ftol: float, xtol: float, gtol: float,
             scheme: LMScheme) -> _Active:
    """One LM iteration of the active problems; the problems that stop are written to ``out``;
    returns the state of the others."""
    th, cost, A, g, lam, nu = act.theta, act.cost, act.A, act.g, act.lam, act.nu
    # freeze coordinates at a bound whose descent direction (g) points outward
    free = ~(((th <= lo) & (g < 0)) | ((th >= hi) & (g > 0)))
    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    if scheme.scaling == "max":
        diag = torch.maximum(act.scale, diag)
    diag = torch.maximum(diag, eps * diag.amax(-1, keepdim=True)).clamp_min(tiny)
    damp = lam.unsqueeze(-1) * diag
    all_free = bool(free.all())
    if all_free:  # nothing frozen (the common case): the same matrix without the masks
        M, gf = A + eye * damp.unsqueeze(-1), g
    else:
        ff = free.unsqueeze(-1) & free.unsqueeze(-2)
        M = torch.where(ff, A, 0.0) + eye * torch.where(free, damp, 1.0).unsqueeze(-1)
        gf = torch.where(free, g, 0.0)
    chol, info = torch.linalg.cholesky_ex(M)
    ok = info == 0
    delta = torch.cholesky_solve(gf.unsqueeze(-1), chol).squeeze(-1)
    delta = torch.where(ok.unsqueeze(-1) & torch.isfinite(delta), delta, 0.0)
    too_curved = None
    if scheme.geodesic:
        accel = geodesic_acceleration(act.sub, th, delta, chol, None if all_free else free, scheme.fd_step)
        usable = torch.isfinite(accel).all(-1)
        accel = torch.where(usable.unsqueeze(-1), accel, 0.0)
        root = diag.sqrt()
        ratio = 2 * (root * accel).norm(dim=-1) / (root * delta).norm(dim=-1)
        too_curved = usable & (ratio > scheme.accel_ratio)  # rejected: the step leaves the geodesic
        delta = delta + 0.5 * accel
    cand = torch.minimum(torch.maximum(th + delta, lo), hi)
    step = cand - th
    lin = act.sub.linearize(cand)
    cost_new = 0.5 * lin.r.square().sum(-1)
    actual = cost - cost_new
    # step^T A step by two products, in the order torch.einsum("bp,bpq,bq->b") takes without opt_einsum
    quadratic = torch.bmm(torch.bmm(step.unsqueeze(-2), A), step.unsqueeze(-1)).reshape(-1)
    predicted = (step * g).sum(-1) - 0.5 * quadratic
    accept = ok & torch.isfinite(cost_new) & (actual > 0)
    if too_curved is not None:
        accept = accept & ~too_curved
    rho = torch.where(predicted > 0, actual / predicted, 0.0)
    if scheme.damping_update == "nielsen":
        shrink = torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3)
        act.lam = torch.where(accept, lam * shrink, lam * nu)
        act.nu = torch.where(accept, 2.0, nu * 2)
    else:  # delayed gratification: down by 3 after an accepted step, up by 2 after a rejected one
        act.lam = torch.where(accept, (lam / 3).clamp_min(_LAMBDA_MIN), lam * 2)
    x_small = ok & (step.norm(dim=-1) <= xtol * (xtol + th.norm(dim=-1)))
    f_small = accept & (actual <= ftol * cost) & (rho > 0.25)
    act.rel = torch.where(accept, actual / cost, act.rel)
    act.steps = act.steps + 1
    act.theta = torch.where(accept.unsqueeze(-1), cand, th)
    act.cost = torch.where(accept, cost_new, cost)
    zero = (cost_new == 0) & accept
    done = x_small | f_small | zero
    small_g = resolved = torch.zeros_like(accept)
    stop_bad = None
    n_accepted = int(accept.sum())
    if n_accepted:
        acc = rows_where(accept) if n_accepted < accept.numel() else None
        A_a, g_a = lin.normal_equations(acc)
        bad = ~(torch.isfinite(A_a).flatten(1).all(-1) & torch.isfinite(g_a).all(-1))
        theta_a, cost_a, n_a = take_rows(acc, act.theta), take_rows(acc, act.cost), take_rows(acc, act.sub.n_eff)
        small_a = _grad_test(g_a, theta_a, n_a, lo, hi, cost_a, gtol) & ~bad
        resolved_a = torch.zeros_like(small_a)
        if scheme.resolution > 0:
            resolved_a = resolution_test(A_a, g_a, theta_a, cost_a, n_a, lo, hi, scheme.resolution) & ~bad
        if acc is None:
            act.A, act.g = A_a, g_a
            act.scale = torch.maximum(act.scale, torch.diagonal(A_a, dim1=-2, dim2=-1))
            stop_bad, small_g, resolved = bad, small_a, resolved_a
        else:
            act.A[acc], act.g[acc] = A_a, g_a
            act.scale[acc] = torch.maximum(act.scale[acc], torch.diagonal(A_a, dim1=-2, dim2=-1))
            stop_bad = torch.zeros_like(accept)
            stop_bad[acc] = bad
            small_g, resolved = small_g.clone(), resolved.clone()
            small_g[acc], resolved[acc] = small_a, resolved_a
        done = done | small_g | resolved
    del lin
    converged = done if stop_bad is None else done & ~stop_bad
    capped = act.lam > _LAMBDA_MAX
    leave = done | capped | (act.steps >= max_iter)
    if stop_bad is not None:
        leave |= stop_bad
    if not bool(leave.any()):
        return act
    # write out the problems that stop, with the test that stopped them; keep the others
    reason = torch.where(capped, stop_code("damping"), stop_code("max_iter"))
    for test, name in ((resolved, "resolution"), (x_small, "xtol"), (f_small, "ftol"), (small_g, "gtol"),
                       (zero, "zero_risk")):  # the strictest test that fired is named
        reason = torch.where(test, stop_code(name), reason)
    if stop_bad is not None:
        reason = torch.where(stop_bad, stop_code("diverged"), reason)
    rows = act.rows[leave]
    out.theta[rows], out.n_iter[rows], out.rel_change[rows] = act.theta[leave], act.steps[leave], act.rel[leave]
    out.converged[rows] = converged[leave]
    out.stop[rows] = reason[leave]
    if stop_bad is not None:
        out.diverged[rows] = stop_bad[leave]
    return act.keep(torch.nonzero(~leave).squeeze(-1))


#: fewest samples (problems x n) one worker thread is given: below it the torch operations are
#: short enough that the threads mostly wait for each other (Python's GIL)
MIN_SAMPLES_PER_WORKER = 20_000
#: the stack of each worker thread is ``1 / THREAD_STACK_SPLIT`` of its share of the problems; a
#: smaller stack is refilled from the common queue as its problems stop (load balance) but pays the
#: per-step overhead on fewer problems. Measured on 2 cores (16 HMoE fits, n = 1e4; near-truth
#: starts of both structures and random starts): equal shares (1) took 5-10% less CPU than half
#: shares (2) and no more wall time, so each thread takes its share at once
THREAD_STACK_SPLIT = 1


def worker_threads(workers: int, total: int, n: int) -> int:
    """Worker threads for ``total`` problems of ``n`` samples: at most ``workers``, and each with at
    least ``MIN_SAMPLES_PER_WORKER`` samples."""
    return max(1, min(workers, total, total * n // MIN_SAMPLES_PER_WORKER))


def solve_lm_in_threads(problem: Problem, theta0: torch.Tensor, threads: int, **options: object) -> SolverOutput:
    """:func:`solve_lm` on ``threads`` threads with one torch thread each, sharing the stack's queue
    and output; each keeps ``ceil(B / (threads * THREAD_STACK_SPLIT))`` problems active and takes
    the next from the queue (if any is left) as its own stop; then they balance their active problems
    (:meth:`RowQueue.balance`). A solver that fails closes the queue, so that no other waits for its
    problems. torch's thread count is restored after.
    ``options``: those of :func:`solve_lm` (``max_iter``, ``ftol``, ``xtol``, ``gtol``, ``scheme``)."""
    B = theta0.shape[0]
    # what depends on the data alone, formed once for the whole stack before the threads share it
    problem.prepared()
    problem.input_products()
    out = start_output(theta0, problem.lo, problem.hi)
    queue = RowQueue(B, solvers=threads)
    stack = max(1, math.ceil(B / (threads * THREAD_STACK_SPLIT)))

    def solver(number: int) -> None:
        try:
            solve_lm(problem, theta0, queue=queue, stack=stack, out=out, solver=number, **options)
        except BaseException:
            queue.close()  # the others must not wait for this solver's problems
            raise

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hmoe-sim-lm") as pool:
            futures = [pool.submit(solver, number) for number in range(threads)]
            for future in futures:
                future.result()
    finally:
        torch.set_num_threads(previous)
    return out


def _grad_test(g: torch.Tensor, theta: torch.Tensor, n_eff: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               cost: torch.Tensor, gtol: float) -> torch.Tensor:
    """:func:`gradient_small` from ``g = J^T r``: the risk gradient is ``-2 g / n``, the risk ``2 cost / n``."""
    return gradient_small(-2 * g / n_eff.unsqueeze(-1), theta, lo, hi, 2 * cost / n_eff, gtol)
