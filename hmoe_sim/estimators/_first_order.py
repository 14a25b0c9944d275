"""Batched first-order solvers: full-batch Adam and the sibling papers' minibatch SGD (private).

Both act on every problem at once; the per-problem losses are summed before the backward
pass, which gives each problem the gradient of its own loss (problems share no parameter).
Bounds are enforced by clipping after each step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from hmoe_sim.estimators._core import Problem, SolverOutput, gradient_small, risk_and_gradient, stop_code

__all__ = ["solve_adam", "solve_sgd_paper"]


def _clip(theta: torch.Tensor, problem: Problem) -> torch.Tensor:
    return torch.minimum(torch.maximum(theta, problem.lo), problem.hi)


def _finish(problem: Problem, theta: torch.Tensor, n_iter: torch.Tensor, rel: torch.Tensor,
            diverged: torch.Tensor, gtol: float) -> SolverOutput:
    risk, grad = risk_and_gradient(problem, theta)
    bad = diverged | ~torch.isfinite(risk) | ~torch.isfinite(theta).all(-1)
    small = gradient_small(grad, theta, problem.lo, problem.hi, risk, gtol)
    converged = small & ~bad
    stop = torch.where(bad, stop_code("diverged"), torch.where(converged, stop_code("gtol"), stop_code("max_iter")))
    return SolverOutput(theta=theta, n_iter=n_iter, rel_change=rel, converged=converged, diverged=bad, stop=stop)


def solve_adam(
    problem: Problem,
    theta0: torch.Tensor,
    *,
    max_iter: int,
    ftol: float,
    gtol: float,
    lr: float = 1e-2,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    progress: Callable[[int, int], None] | None = None,
) -> SolverOutput:
    """Full-batch Adam on each problem's empirical risk ``RSS_b / n_b``.

    A problem stops when the sup-norm of its projected gradient is at most ``gtol * risk``
    (converged) or when its risk became non-finite (diverged); the others go on until
    ``max_iter``. ``rel_change`` is ``|risk_t - risk_{t-1}| / risk_{t-1}`` of its last step.
    """
    theta = _clip(theta0, problem).clone()
    B = theta.shape[0]
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    step_count = torch.zeros(B, dtype=theta.dtype, device=theta.device)
    n_iter = torch.zeros(B, dtype=torch.long, device=theta.device)
    rel = torch.full((B,), float("nan"), dtype=theta.dtype, device=theta.device)
    prev = torch.full((B,), float("nan"), dtype=theta.dtype, device=theta.device)
    diverged = torch.zeros(B, dtype=torch.bool, device=theta.device)
    active = torch.ones(B, dtype=torch.bool, device=theta.device)
    b1, b2 = betas
    for it in range(max_iter):
        risk, grad = risk_and_gradient(problem, theta)
        diverged |= active & ~(torch.isfinite(risk) & torch.isfinite(grad).all(-1))
        active &= ~diverged & ~gradient_small(grad, theta, problem.lo, problem.hi, risk, gtol)
        rel = torch.where(active & torch.isfinite(prev), (risk - prev).abs() / prev, rel)
        prev = torch.where(active, risk, prev)
        if not bool(active.any()):
            break
        a = active.unsqueeze(-1)
        step_count = step_count + active.to(theta.dtype)
        m = torch.where(a, b1 * m + (1 - b1) * grad, m)
        v = torch.where(a, b2 * v + (1 - b2) * grad.square(), v)
        t = step_count.clamp_min(1).unsqueeze(-1)
        update = lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        theta = torch.where(a, _clip(theta - update, problem), theta)
        n_iter += active.long()
        if progress is not None:
            progress(it + 1, int(active.sum()))
    return _finish(problem, theta, n_iter, rel, diverged, gtol)


def _permutation(seed: np.random.SeedSequence, size: int, epoch: int) -> np.ndarray:
    child = np.random.SeedSequence(seed.entropy, spawn_key=(*seed.spawn_key, epoch))
    return np.random.default_rng(child).permutation(size)


def solve_sgd_paper(
    problem: Problem,
    theta0: torch.Tensor,
    *,
    seeds: Sequence[np.random.SeedSequence],
    gtol: float,
    epochs: int = 10,
    lr: float = 0.1,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> SolverOutput:
    """The sibling papers' protocol: plain minibatch SGD, fixed epochs and learning rate.

    Each epoch visits every sample of a data set once in a fresh random order drawn from
    that data set's own seed; a step uses the mean squared error of ``batch_size``
    samples. Problems with fewer samples simply stop stepping earlier in an epoch.
    ``n_iter`` counts SGD steps; ``rel_change`` is the relative change of the full-data
    risk over the last epoch; ``converged`` is the projected-gradient test (rarely met:
    ten epochs do not converge, which is what the comparison shows).
    """
    theta = _clip(theta0, problem).clone()
    B, n = problem.y.shape
    dev = theta.device
    sizes = problem.n_eff.round().long().tolist()
    # positions of each data set's own samples (the masked-in rows)
    positions = [torch.nonzero(problem.weight[b] > 0).squeeze(-1).cpu() for b in range(B)]
    steps_per_epoch = max(-(-s // batch_size) for s in sizes)
    n_iter = torch.zeros(B, dtype=torch.long, device=dev)
    diverged = torch.zeros(B, dtype=torch.bool, device=dev)
    prev, _ = risk_and_gradient(problem, theta)
    rel = torch.full((B,), float("nan"), dtype=theta.dtype, device=dev)
    rows = torch.arange(B, device=dev).unsqueeze(-1)
    for epoch in range(epochs):
        order = torch.zeros(B, steps_per_epoch * batch_size, dtype=torch.long)
        valid = torch.zeros(B, steps_per_epoch * batch_size, dtype=torch.bool)
        for b in range(B):
            perm = torch.from_numpy(_permutation(seeds[b], sizes[b], epoch))
            order[b, : sizes[b]] = positions[b][perm]
            valid[b, : sizes[b]] = True
        for s in range(steps_per_epoch):
            cols = slice(s * batch_size, (s + 1) * batch_size)
            pick, w = order[:, cols].to(dev), valid[:, cols].to(dev)
            sub = Problem(problem.model, problem.X[rows, pick], problem.y[rows, pick],
                          w.to(theta.dtype), w.sum(-1).clamp_min(1).to(theta.dtype),
                          problem.lo, problem.hi)
            _, grad = risk_and_gradient(sub, theta)
            moving = w.any(-1) & ~diverged
            diverged |= moving & ~torch.isfinite(grad).all(-1)
            moving &= ~diverged
            theta = torch.where(moving.unsqueeze(-1), _clip(theta - lr * grad, problem), theta)
            n_iter += moving.long()
        risk, _ = risk_and_gradient(problem, theta)
        rel = (risk - prev).abs() / prev
        prev = risk
        if progress is not None:
            progress(epoch + 1, int((~diverged).sum()))
    return _finish(problem, theta, n_iter, rel, diverged, gtol)
