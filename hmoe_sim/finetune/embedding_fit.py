"""Fitting an adapted model's sentence embeddings to targets (the optimisers of issue 21).

* :func:`fit_embeddings` -- full-batch least squares by L-BFGS to a relative gradient tolerance
  (:func:`gradient_converged`); used where the least-squares optimum itself is wanted (the
  LoRA floor check on noise-free targets).
* :func:`fit_embeddings_adam` -- mini-batch Adam at a given learning rate with early stopping on
  a validation set; the best validation point is restored (the experiment's students).

Both read ``student.embed(hidden, mask)`` (``(S, E)`` embeddings from ``(S, T, E)`` hidden
states and a ``(S, T)`` mask) and work on any module with that method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hmoe_sim._validation import check_positive_float, check_positive_int

__all__ = ["Chunks", "early_stopping_done", "fit_embeddings", "fit_embeddings_adam", "gradient_converged"]

#: ``(positions, hidden, mask)`` per chunk: rows ``positions`` of the target tensor
Chunks = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _trainable(student: nn.Module) -> list[nn.Parameter]:
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the student has no trainable parameters")
    return params


def _squared_error(student: nn.Module, chunks: Chunks, targets: torch.Tensor, *, backward: bool) -> torch.Tensor:
    """Mean squared error over ``chunks`` (all entries of ``targets``); gradients accumulated when asked."""
    total = torch.zeros((), dtype=targets.dtype, device=targets.device)
    for pos, hidden, mask in chunks:
        with torch.set_grad_enabled(backward):
            loss = (student.embed(hidden, mask) - targets[pos]).pow(2).sum() / targets.numel()
        if backward:
            loss.backward()
        total += loss.detach()
    return total


def gradient_converged(grad_max: float, grad_start: float, grad_rtol: float) -> bool:
    """The L-BFGS convergence rule: ``grad_max <= grad_rtol * grad_start`` (both max-abs gradients)."""
    return bool(grad_max <= grad_rtol * grad_start)


def fit_embeddings(student: nn.Module, chunks: Chunks, targets: torch.Tensor, *, max_iter: int = 2000,
                   grad_rtol: float = 1e-3) -> dict[str, float | int | bool | str]:
    """Least squares of ``student.embed`` on ``targets`` over the trainable tensors, by full-batch L-BFGS.

    The loss is the mean over sentences and coordinates of the squared error; chunks are
    accumulated into one gradient (strong Wolfe line search, history 20). L-BFGS runs until the
    max-abs gradient is at most ``grad_rtol`` times its value at the start
    (:func:`gradient_converged`), ``max_iter`` iterations or ``2 max_iter`` loss evaluations, or
    until a step changes nothing.

    Returns
    -------
    dict
        ``train_mse``, ``grad_start`` and ``grad_max`` (max-abs gradient at the start and end),
        ``iterations``, ``evaluations`` (loss and gradient evaluations, the start and end ones
        included), ``stop`` (``"gradient"``, ``"cap"`` or ``"stalled"``) and ``converged``.
    """
    params = _trainable(student)
    max_iter = check_positive_int("max_iter", max_iter)
    check_positive_float("grad_rtol", grad_rtol)
    evaluations = 0

    def closure() -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        for p in params:
            p.grad = None
        return _squared_error(student, chunks, targets, backward=True)

    def grad_max() -> float:
        return max(float(p.grad.abs().max()) for p in params)

    closure()
    start = grad_max()
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                            tolerance_grad=grad_rtol * start, tolerance_change=0.0, history_size=20,
                            line_search_fn="strong_wolfe")
    opt.step(closure)
    loss = closure()
    end = grad_max()
    iterations = int(opt.state[params[0]].get("n_iter", 0))
    converged = gradient_converged(end, start, grad_rtol)
    capped = iterations >= max_iter or evaluations >= 2 * max_iter + 1
    stop = "gradient" if converged else ("cap" if capped else "stalled")
    return {"train_mse": float(loss), "grad_start": start, "grad_max": end, "iterations": iterations,
            "evaluations": evaluations, "stop": stop, "converged": converged}


def early_stopping_done(history: list[float], patience: int, min_rel_improvement: float) -> bool:
    """The early-stopping rule: the last ``patience`` validation losses all failed to improve on the best
    before them by more than ``min_rel_improvement`` (relative)."""
    if len(history) <= patience:
        return False
    best_before = min(history[:-patience])
    return min(history[-patience:]) > best_before * (1 - min_rel_improvement)


def fit_embeddings_adam(student: nn.Module, train_chunks: Callable[[torch.Tensor], Chunks], n_train: int,
                        targets: torch.Tensor, val_chunks: Chunks, val_targets: torch.Tensor, *, lr: float,
                        batch_size: int = 32, max_steps: int = 4000, eval_every: int = 10, patience: int = 10,
                        min_rel_improvement: float = 1e-3, seed: int = 0) -> dict[str, float | int | bool | str]:
    """Mini-batch Adam on the mean squared error with early stopping on a validation set.

    Each epoch visits the ``n_train`` training rows in a fresh random order, in batches of
    ``min(batch_size, n_train)`` (the last one may be smaller); ``train_chunks(rows)`` gives the
    chunks of the rows ``rows`` of ``targets``. Every ``eval_every`` steps (and at step 0) the
    validation MSE is measured; the fit stops when :func:`early_stopping_done` says so
    (``patience`` checks without a relative improvement of ``min_rel_improvement``) or after
    ``max_steps`` steps, and the parameters of the best validation check are restored.

    Returns
    -------
    dict
        ``train_mse`` (all training rows, restored parameters), ``val_mse`` (best), ``val_start``
        (at step 0), ``best_step``, ``iterations`` (steps taken), ``evaluations`` (sentence
        gradient evaluations over ``n_train``: training-set passes), ``stop`` (``"early"`` or
        ``"cap"``) and ``converged`` (stopped early).
    """
    params = _trainable(student)
    n_train = check_positive_int("n_train", n_train)
    batch = min(check_positive_int("batch_size", batch_size), n_train)
    max_steps = check_positive_int("max_steps", max_steps)
    eval_every = check_positive_int("eval_every", eval_every)
    patience = check_positive_int("patience", patience)
    opt = torch.optim.Adam(params, lr=check_positive_float("lr", lr))
    gen = torch.Generator().manual_seed(seed)
    device = targets.device

    def validate() -> float:
        return float(_squared_error(student, val_chunks, val_targets, backward=False))

    history = [validate()]
    best = history[0]
    best_state = [p.detach().clone() for p in params]
    best_step, step, seen = 0, 0, 0
    order = torch.empty(0, dtype=torch.long)
    stop = "cap"
    while step < max_steps:
        if len(order) == 0:
            order = torch.randperm(n_train, generator=gen)
        rows, order = order[:batch].to(device), order[batch:]
        opt.zero_grad(set_to_none=True)
        sub = targets[rows]
        for pos, hidden, mask in train_chunks(rows):
            loss = (student.embed(hidden, mask) - sub[pos]).pow(2).sum() / sub.numel()
            loss.backward()
        opt.step()
        step += 1
        seen += len(rows)
        if step % eval_every == 0:
            history.append(validate())
            if history[-1] < best:
                best, best_step = history[-1], step
                best_state = [p.detach().clone() for p in params]
            if early_stopping_done(history, patience, min_rel_improvement):
                stop = "early"
                break
    with torch.no_grad():
        for p, saved in zip(params, best_state, strict=True):
            p.copy_(saved)
    train = float(_squared_error(student, train_chunks(torch.arange(n_train, device=device)), targets,
                                 backward=False))
    return {"train_mse": train, "val_mse": best, "val_start": history[0], "best_step": best_step,
            "iterations": step, "evaluations": seen / n_train, "stop": stop, "converged": stop == "early"}
