"""Batched projected Levenberg-Marquardt with per-problem damping (private).

Every problem ``b`` keeps its own damping ``lambda_b``, its own acceptance test and its
own stopping rule; a problem that has stopped is removed from the stack, so the answer of
one problem never depends on the others. Bounds are handled by projection: coordinates at
a bound whose descent direction points outward are frozen for the step (their row and
column of the damped normal matrix replaced by the identity), the step is solved for the
others and the candidate is clipped into the box (a projected Levenberg-Marquardt method
in the spirit of Kanzow, Yamashita and Fukushima, 2004).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from hmoe_sim.estimators._core import Problem, SolverOutput, gradient_small

__all__ = ["solve_lm"]

_LAMBDA_MAX = 1e20


def _index(mask: torch.Tensor) -> torch.Tensor | None:
    """Indices where ``mask`` holds, or ``None`` when it holds everywhere (no gather)."""
    if bool(mask.all()):
        return None
    return torch.nonzero(mask).squeeze(-1)


def _pick(idx: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    return t if idx is None else t[idx]


def solve_lm(
    problem: Problem,
    theta0: torch.Tensor,
    *,
    max_iter: int,
    ftol: float,
    xtol: float,
    gtol: float,
    damping: float = 1e-3,
    progress: Callable[[int, int], None] | None = None,
) -> SolverOutput:
    """Minimise ``0.5 * ||w_b (y_b - f(theta_b; X_b))||^2`` for every problem ``b``.

    Stopping rules (per problem, as in MINPACK / ``scipy.optimize.least_squares``):
    ``ftol``: an accepted step with gain ratio above 1/4 lowered the cost by less than
    ``ftol * cost``; ``xtol``: a step shorter than ``xtol * (xtol + ||theta||)``;
    ``gtol``: the sup-norm of the projected gradient of the empirical risk ``RSS/n`` is at
    most ``gtol * RSS/n``; or the cost is exactly zero. Damping above ``1e20`` stops the problem
    as not converged.

    Work per iteration: one linearisation of the active problems at their candidates
    (residuals and the per-atom Jacobian blocks, :meth:`Problem.linearize`), and the normal
    equations of the accepted ones only, from that same linearisation. The stack of active
    problems is gathered again only when a problem leaves it.

    Returns
    -------
    SolverOutput
        ``rel_change`` is the relative cost reduction of the last accepted step.
    """
    B, P = theta0.shape
    lo, hi = problem.lo, problem.hi
    theta = torch.minimum(torch.maximum(theta0, lo), hi).clone()
    lin = problem.linearize(theta)
    cost = 0.5 * lin.r.square().sum(-1)
    A, g = lin.normal_equations()
    del lin
    finite = torch.isfinite(cost) & torch.isfinite(A).flatten(1).all(-1) & torch.isfinite(g).all(-1)
    diverged = ~finite
    scale = torch.diagonal(A, dim1=-2, dim2=-1).clone()
    lam = torch.full((B,), damping, dtype=theta.dtype, device=theta.device)
    nu = torch.full_like(lam, 2.0)
    n_iter = torch.zeros(B, dtype=torch.long, device=theta.device)
    rel_change = torch.full_like(lam, float("nan"))
    converged = finite & ((cost == 0) | _grad_test(g, theta, problem.n_eff, lo, hi, cost, gtol))
    active = finite & ~converged
    eye = torch.eye(P, dtype=theta.dtype, device=theta.device)
    tiny = torch.finfo(theta.dtype).tiny
    eps = torch.finfo(theta.dtype).eps
    sub, sub_idx = problem, None

    for it in range(max_iter):
        if not bool(active.any()):
            break
        idx = _index(active)
        if not _same_index(idx, sub_idx):
            sub, sub_idx = problem.take(idx), idx
        th, A_, g_, lam_, cost_ = _pick(idx, theta), _pick(idx, A), _pick(idx, g), _pick(idx, lam), _pick(idx, cost)
        # freeze coordinates at a bound whose descent direction (g) points outward
        free = ~(((th <= lo) & (g_ < 0)) | ((th >= hi) & (g_ > 0)))
        ff = free.unsqueeze(-1) & free.unsqueeze(-2)
        diag = torch.maximum(_pick(idx, scale), torch.diagonal(A_, dim1=-2, dim2=-1))
        diag = torch.maximum(diag, eps * diag.amax(-1, keepdim=True)).clamp_min(tiny)
        damp = torch.where(free, lam_.unsqueeze(-1) * diag, torch.ones_like(diag))
        M = torch.where(ff, A_, torch.zeros_like(A_)) + eye * damp.unsqueeze(-1)
        gf = torch.where(free, g_, torch.zeros_like(g_))
        chol, info = torch.linalg.cholesky_ex(M)
        ok = info == 0
        delta = torch.cholesky_solve(gf.unsqueeze(-1), chol).squeeze(-1)
        delta = torch.where(ok.unsqueeze(-1) & torch.isfinite(delta), delta, torch.zeros_like(delta))
        cand = torch.minimum(torch.maximum(th + delta, lo), hi)
        step = cand - th
        lin = sub.linearize(cand)
        cost_new = 0.5 * lin.r.square().sum(-1)
        actual = cost_ - cost_new
        predicted = (step * g_).sum(-1) - 0.5 * torch.einsum("bp,bpq,bq->b", step, A_, step)
        accept = ok & torch.isfinite(cost_new) & (actual > 0)
        rho = torch.where(predicted > 0, actual / predicted, torch.zeros_like(actual))
        shrink = torch.clamp(1 - (2 * rho - 1) ** 3, min=1 / 3)
        lam_next = torch.where(accept, lam_ * shrink, lam_ * _pick(idx, nu))
        nu_next = torch.where(accept, torch.full_like(lam_, 2.0), _pick(idx, nu) * 2)
        x_small = ok & (step.norm(dim=-1) <= xtol * (xtol + th.norm(dim=-1)))
        f_small = accept & (actual <= ftol * cost_) & (rho > 0.25)
        rel = torch.where(accept, actual / cost_, _pick(idx, rel_change))

        # write back (index_put on the active rows; a full-batch step assigns directly)
        rows = torch.arange(B, device=theta.device) if idx is None else idx
        n_iter[rows] += 1
        lam[rows], nu[rows], rel_change[rows] = lam_next, nu_next, rel
        acc_rows = rows[accept]
        theta[acc_rows] = cand[accept]
        cost[acc_rows] = cost_new[accept]
        done = x_small | f_small | (cost_new == 0) & accept
        stalled = lam_next > _LAMBDA_MAX
        stop_bad = torch.zeros_like(accept)
        if acc_rows.numel():
            acc_local = _index(accept)
            A_a, g_a = lin.normal_equations(acc_local)
            bad = ~(torch.isfinite(A_a).flatten(1).all(-1) & torch.isfinite(g_a).all(-1))
            A[acc_rows], g[acc_rows] = A_a, g_a
            scale[acc_rows] = torch.maximum(scale[acc_rows], torch.diagonal(A_a, dim1=-2, dim2=-1))
            diverged[acc_rows[bad]] = True
            small_g = _grad_test(g_a, theta[acc_rows], problem.n_eff[acc_rows], lo, hi, cost[acc_rows], gtol)
            grad_done = torch.zeros_like(accept)
            grad_done[accept] = small_g & ~bad
            done = done | grad_done
            stop_bad[accept] = bad
        del lin
        converged[rows] = done & ~stop_bad
        active[rows] = ~(done | stalled | stop_bad)
        if progress is not None:
            progress(it + 1, int(active.sum()))
    return SolverOutput(theta=theta, n_iter=n_iter, rel_change=rel_change, converged=converged, diverged=diverged)


def _same_index(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two results of :func:`_index` select the same rows."""
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and bool(torch.equal(a, b))


def _grad_test(g: torch.Tensor, theta: torch.Tensor, n_eff: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               cost: torch.Tensor, gtol: float) -> torch.Tensor:
    """:func:`gradient_small` from ``g = J^T r``: the risk gradient is ``-2 g / n``, the risk ``2 cost / n``."""
    return gradient_small(-2 * g / n_eff.unsqueeze(-1), theta, lo, hi, 2 * cost / n_eff, gtol)
