"""Public interface: ``fit_batch`` (many least-squares problems at once) and ``fit_multistart``."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from hmoe_sim._validation import check_choice, check_float_tensor, check_number, check_positive_int, check_seed
from hmoe_sim.data import SeedLike
from hmoe_sim.devices import resolve_device, resolve_dtype
from hmoe_sim.estimators._core import Problem, SolverOutput
from hmoe_sim.estimators._first_order import solve_adam, solve_sgd_paper
from hmoe_sim.estimators._lm import solve_lm, solve_lm_in_threads, worker_threads
from hmoe_sim.estimators.bounds import Bounds
from hmoe_sim.estimators.init import init_random
from hmoe_sim.estimators.result import FitResult, best_of_starts, certificate
from hmoe_sim.models.base import MixtureModel, Params

__all__ = [
    "METHODS",
    "as_bounds",
    "auto_chunk_size",
    "fit_batch",
    "fit_multistart",
    "jacobian_bytes",
]

METHODS = ("lm", "adam", "sgd-paper")
LOSSES = ("ls", "mle")
#: memory the Jacobian work of one chunk may use on the CPU (bytes)
CPU_CHUNK_BUDGET = 2 * 1024**3
#: working copies of the ``(n, P)`` Jacobian block one problem needs with reverse-mode
#: autodiff (expanded parameters, their gradient, the masked Jacobian, autograd intermediates)
_JACOBIAN_COPIES = 8
#: the same with a model's analytic ``value_and_jacobian`` (the Jacobian, its masked copy, slack)
_ANALYTIC_JACOBIAN_COPIES = 3


def jacobian_bytes(n: int, n_params: int, dtype: torch.dtype, *, analytic: bool = False) -> int:
    """Bytes of Jacobian work one least-squares problem needs (what :func:`auto_chunk_size` budgets).

    Parameters
    ----------
    n : int
        Sample size of the problem.
    n_params : int
        Number of free parameters ``P`` of the fitted model.
    dtype : torch.dtype
        Dtype of the fit.
    analytic : bool
        Whether the model has an analytic ``value_and_jacobian`` (``3 * n * P`` numbers);
        otherwise reverse-mode autodiff (``8 * n * P`` numbers).

    Returns
    -------
    int
        ``copies * n * max(P, 1) * itemsize``.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    copies = _ANALYTIC_JACOBIAN_COPIES if analytic else _JACOBIAN_COPIES
    return copies * n * max(n_params, 1) * itemsize


def auto_chunk_size(n: int, n_params: int, dtype: torch.dtype, device: torch.device, *,
                    analytic: bool = False, max_memory: int | None = None) -> int:
    """Problems per chunk such that the Jacobian work fits in memory.

    One problem needs about ``8 * n * P`` numbers with autodiff Jacobians, ``3 * n * P`` with
    a model's analytic one (``analytic=True``); the budget is ``max_memory`` bytes when given,
    else 2 GiB on the CPU and half the free memory of a CUDA device. The data themselves
    (``X``, ``y`` of the whole batch) are not part of the budget.

    Raises
    ------
    ValueError
        ``max_memory`` is given and smaller than what one problem needs.
    """
    per_problem = jacobian_bytes(n, n_params, dtype, analytic=analytic)
    if max_memory is not None:
        budget = check_positive_int("max_memory", max_memory)
        if budget < per_problem:
            raise ValueError(f"max_memory={budget} bytes is below the {per_problem} bytes one problem needs "
                             f"(n={n}, P={n_params}, {dtype})")
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 2
    else:
        budget = CPU_CHUNK_BUDGET
    return max(1, int(budget // per_problem))


def as_bounds(bounds: Bounds | Mapping[str, tuple[float, float]] | None) -> Bounds:
    """The box ``bounds`` describes, as a :class:`Bounds`.

    Parameters
    ----------
    bounds : Bounds, mapping name -> (low, high), or None
        ``None`` is the default box; a mapping gives per-parameter limits.

    Returns
    -------
    Bounds

    Raises
    ------
    TypeError
        ``bounds`` is of another type.
    """
    if bounds is None:
        return Bounds()
    if isinstance(bounds, Bounds):
        return bounds
    if isinstance(bounds, Mapping):
        return Bounds(bounds)
    raise TypeError(f"bounds must be a Bounds, a dict name -> (low, high) or None, got {type(bounds).__name__}")


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "not enough memory" in str(err))


def _seed_list(seed: SeedLike | Sequence[SeedLike], count: int) -> list[np.random.SeedSequence]:
    """One SeedSequence per data set: a sequence is used as given, one seed is spawned."""
    if isinstance(seed, Sequence) and not isinstance(seed, str):
        if len(seed) != count:
            raise ValueError(f"seed: got {len(seed)} seeds for {count} data sets")
        for i, s in enumerate(seed):
            check_seed(f"seed[{i}]", s, generator=False)
        return [s if isinstance(s, np.random.SeedSequence) else np.random.SeedSequence(int(s)) for s in seed]
    check_seed("seed", seed, generator=False)
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))  # type: ignore[arg-type]
    return [np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, b)) for b in range(count)]


#: dtypes the estimators compute in (the Cholesky and triangular solves need one of these)
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def _check_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {dtype}; the estimators support {', '.join(map(str, SUPPORTED_DTYPES))} "
                        "(convert with .double() or pass dtype='float64')")
    return dtype


def _check_finite_data(name: str, value: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise naming ``name`` and the first index (within ``mask``) that holds NaN or inf.

    ``value`` is ``y`` (same shape as ``mask``) or ``X`` (one more trailing axis).
    """
    bad = ~torch.isfinite(value)
    rows = (bad.any(-1) if value.dim() == mask.dim() + 1 else bad) & mask
    if not bool(rows.any()):
        return
    first = tuple(torch.nonzero(rows)[0].tolist())
    entry = value[first]
    if entry.dim():
        column = int(torch.nonzero(~torch.isfinite(entry))[0])
        first, entry = (*first, column), entry[column]
    raise ValueError(f"{name} contains non-finite values (first at index {first}: {entry.item()!r}); "
                     "remove or impute them before fitting")


def _check_data(model: MixtureModel, X: object, y: object, mask: object) -> tuple[torch.Tensor, ...]:
    """Shapes, dtype and finiteness of a batch of data sets (entries outside ``mask`` are not read)."""
    X = check_float_tensor("X", X)
    y = check_float_tensor("y", y)
    if X.dim() != 3 or X.shape[-1] != model.input_dim:
        raise ValueError(f"X has shape {tuple(X.shape)}; expected (B, n, {model.input_dim})")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X has shape {tuple(X.shape)}; expected a non-empty batch (B >= 1 data sets of "
                         "n >= 1 samples)")
    if tuple(y.shape) != tuple(X.shape[:2]):
        raise ValueError(f"y has shape {tuple(y.shape)}; expected {tuple(X.shape[:2])} to match X")
    if mask is None:
        mask = torch.ones(y.shape, dtype=torch.bool, device=y.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != y.shape:
        raise ValueError(f"mask must be a bool tensor of shape {tuple(y.shape)}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    counts = mask.sum(-1)
    if bool((counts == 0).any()):
        raise ValueError(f"mask leaves data set(s) {torch.nonzero(counts == 0).squeeze(-1).tolist()} empty")
    _check_finite_data("X", X, mask.to(X.device))
    _check_finite_data("y", y, mask.to(y.device))
    return X, y, mask


def _check_init_in_box(model: MixtureModel, theta0: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Raise naming the first parameter (and entry) of a start outside the box ``[lo, hi]``.

    Rows of ``theta0`` are flattened starts (``model.flatten`` order); NaN counts as outside.
    """
    outside = ~((theta0 >= lo) & (theta0 <= hi))
    if not bool(outside.any()):
        return
    row, col = (int(v) for v in torch.nonzero(outside)[0])
    start = 0
    for name, shape in model.param_shapes().items():
        size = math.prod(shape)
        if col < start + size:
            entry = tuple(int(i) for i in np.unravel_index(col - start, shape)) if shape else ()
            value = float(theta0[row, col])
            side = f"lower bound {float(lo[col])!r}" if not value >= float(lo[col]) else \
                f"upper bound {float(hi[col])!r}"
            raise ValueError(f"init: parameter {name!r} entry {entry} of start {row} is {value!r}, outside the box "
                             f"(beyond its {side}; box [{float(lo[col])!r}, {float(hi[col])!r}]); give a start "
                             "inside the bounds, e.g. with Bounds.project")
        start += size


_Fit = TypeVar("_Fit", bound=Callable[..., FitResult])


def _outside_inference_mode(fit: _Fit) -> _Fit:
    """``fit`` run with torch's inference mode off when its caller has it on: the certificate
    differentiates the risk (autograd), which ``torch.inference_mode()`` forbids. Tensors made in
    inference mode are only read (never saved for backward), so they may be passed in; the results
    are ordinary tensors, and the same numbers as outside inference mode."""

    @functools.wraps(fit)
    def outside(*args: Any, **kwargs: Any) -> FitResult:
        if not torch.is_inference_mode_enabled():
            return fit(*args, **kwargs)
        with torch.inference_mode(False):
            return fit(*args, **kwargs)

    return outside  # type: ignore[return-value]


@_outside_inference_mode
def fit_batch(
    model: MixtureModel,
    X: torch.Tensor,
    y: torch.Tensor,
    init: Params,
    *,
    method: str = "lm",
    bounds: Bounds | Mapping[str, tuple[float, float]] | None = None,
    max_iter: int = 200,
    tol: float = 1e-10,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    chunk_size: int | None = None,
    truth: Params | None = None,
    loss: str = "ls",
    mask: torch.Tensor | None = None,
    show_progress: bool = False,
    ftol: float | None = None,
    xtol: float | None = None,
    gtol: float | None = None,
    lr: float | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    seed: SeedLike | Sequence[SeedLike] = 0,
    max_memory: int | None = None,
    workers: int | None = None,
) -> FitResult:
    """Fit ``B`` independent least-squares problems at once.

    Parameters
    ----------
    model : MixtureModel
        The fitted model (structure only).
    X : torch.Tensor
        ``(B, n, D)`` inputs.
    y : torch.Tensor
        ``(B, n)`` responses.
    init : dict of torch.Tensor
        Starts with batch shape ``(B,)``, or ``(B, m)`` for ``m`` starts per data set (all
        ``B * m`` fits run together; the best by empirical risk is kept per data set).
    method : {"lm", "adam", "sgd-paper"}
        Projected Levenberg-Marquardt (converged default), full-batch Adam (``lr`` default
        ``1e-2``, ``max_iter`` steps) or the sibling papers' minibatch SGD (``epochs=10``,
        ``lr`` default ``0.1``, ``batch_size=64``, permutations from ``seed``).
    bounds : Bounds or dict, optional
        Box of the parameters (default ``[-10, 10]`` for every name).
    max_iter : int
        Iteration cap (LM, Adam).
    tol : float
        Default of ``ftol``, ``xtol`` and ``gtol``, each raised to at least ``4 eps`` of the dtype.
    device, dtype : optional
        Where and in which precision to fit (default: those of ``X``).
    chunk_size : int, optional
        Problems per chunk (default :func:`auto_chunk_size`); results do not depend on it.
    max_memory : int, optional
        Memory budget of one chunk's solver work in bytes (:func:`auto_chunk_size`; ignored
        when ``chunk_size`` is given).
    workers : int, optional
        CPU threads that work through the stack at once (``method="lm"``; the other methods
        solve it as one stack), each with one torch thread (torch's thread count is set to 1 for
        the fit and restored after it), taking their shares of the problems from one queue and
        balancing their active problems once it is empty
        (:func:`~hmoe_sim.estimators._lm.solve_lm_in_threads`). Default: torch's thread count on the CPU,
        1 on a GPU. Each thread gets at least ``_lm.MIN_SAMPLES_PER_WORKER`` samples (problems x
        ``n``); a smaller stack is solved as one, with torch's threads. Per problem, results do
        not depend on it except through BLAS rounding, which may depend on torch's thread count.
    truth : dict of torch.Tensor, optional
        True parameters (unbatched or batched ``(B,)``) of ``model.with_atoms(k*)``, the
        number of atoms read from ``truth["beta0"]``; gives ``risk_truth``.
    loss : {"ls", "mle"}
        Least squares or Gaussian MLE with unknown variance: the same minimiser; both
        report ``noise_var`` and ``loglik``.
    mask : torch.Tensor, optional
        ``(B, n)`` bool, the samples of each data set (ragged sample sizes).
    show_progress : bool
        A tqdm bar over chunks.

    Returns
    -------
    FitResult

    Notes
    -----
    Under ``torch.no_grad()`` or ``torch.inference_mode()`` the fit runs as usual (the
    certificate's gradient re-enables autograd locally; inference mode is left for the fit) and
    gives the same numbers.

    Raises
    ------
    ValueError
        Bad shapes or an empty batch, ``X`` on the meta device, NaN or inf in ``X`` or ``y``
        (naming the array and the first bad index), a start outside the box (naming the
        parameter and the bound it crosses), an unknown ``method`` or ``loss``, a bad seed, or
        an option out of range: ``tol`` and ``lr`` must be finite and ``> 0``, ``ftol``,
        ``xtol``, ``gtol`` finite and ``>= 0``, ``max_iter``, ``epochs``, ``batch_size``,
        ``chunk_size`` integers ``>= 1`` (the checks of the sweep config's ``fit.options``).
    TypeError
        ``X`` of a dtype other than float32 / float64 (e.g. float16) without a ``dtype``, or an
        option of the wrong type (e.g. ``max_iter=1.5``).
    """
    if not isinstance(model, MixtureModel):
        raise TypeError(f"model must be a MixtureModel, got {type(model).__name__}")
    check_choice("method", method, METHODS)
    check_choice("loss", loss, LOSSES)
    max_iter = check_positive_int("max_iter", max_iter)
    tol = check_number("tol", tol, minimum=0.0, strict=True)
    ftol, xtol, gtol = (None if v is None else check_number(name, v, minimum=0.0)
                        for name, v in (("ftol", ftol), ("xtol", xtol), ("gtol", gtol)))
    lr = None if lr is None else check_number("lr", lr, minimum=0.0, strict=True)
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    if chunk_size is not None:
        chunk_size = check_positive_int("chunk_size", chunk_size)
    if workers is not None:
        workers = check_positive_int("workers", workers)
    X, y, mask = _check_data(model, X, y, mask)
    dev = X.device if device is None else resolve_device(device)
    dt = _check_dtype("X", X.dtype) if dtype is None else resolve_dtype(dtype)
    box = as_bounds(bounds)
    box.check_names(model)
    B = X.shape[0]
    n_starts = _starts_per_set(model, init, B)
    eps = torch.finfo(dt).eps
    floor = lambda v: max(tol if v is None else float(v), 4 * eps)  # noqa: E731
    if workers is None:
        workers = torch.get_num_threads() if dev.type == "cpu" else 1
    options = dict(method=method, max_iter=max_iter, ftol=floor(ftol), xtol=floor(xtol), gtol=floor(gtol),
                   lr=lr, epochs=epochs, batch_size=batch_size,
                   workers=workers if dev.type == "cpu" and method == "lm" else 1)
    theta0 = model.flatten(model.cast(init, device=dev, dtype=dt)).reshape(B * n_starts, -1)
    X, y, mask = (t.to(dev, dt).repeat_interleave(n_starts, dim=0) for t in (X, y, mask.to(dt)))
    seeds = [s for s in _seed_list(seed, B) for _ in range(n_starts)]
    truth_model, truth_theta = _truth_vector(model, truth, B, n_starts, dev, dt)
    lo, hi = box.vectors(model, dtype=dt, device=dev)
    _check_init_in_box(model, theta0, lo, hi)
    zero = torch.zeros((), dtype=dt, device=dev)  # masked samples are zeroed and carry weight 0
    X, y = torch.where(mask.unsqueeze(-1) > 0, X, zero), torch.where(mask > 0, y, zero)
    size = chunk_size if chunk_size is not None else auto_chunk_size(
        X.shape[1], model.n_params, dt, dev, analytic=hasattr(model, "value_and_jacobian"), max_memory=max_memory)
    size = check_positive_int("chunk_size", size)

    def solve_chunk(sl: slice) -> FitResult:
        problem = Problem(model, X[sl], y[sl], mask[sl], mask[sl].sum(-1), lo, hi)
        out = _solve(problem, theta0[sl], seeds[sl], options)
        t_theta = None if truth_theta is None else truth_theta[sl]
        return certificate(problem, out, box, truth_model, t_theta, method)

    result = _over_chunks(solve_chunk, X.shape[0], size, show_progress)
    return best_of_starts(result, B, n_starts) if n_starts > 1 else result


def _starts_per_set(model: MixtureModel, init: Params, B: int) -> int:
    """``m`` for starts of batch shape ``(B, m)``, 1 for ``(B,)``."""
    batch = model.batch_shape(init)
    if batch not in (torch.Size([B]),) and not (len(batch) == 2 and batch[0] == B):
        raise ValueError(f"init has batch shape {tuple(batch)}; expected ({B},) or ({B}, m) to match X")
    return 1 if len(batch) == 1 else int(batch[1])


def _over_chunks(solve_chunk: Callable[[slice], FitResult], total: int, size: int, show_progress: bool) -> FitResult:
    """Solve ``total`` problems in consecutive chunks of ``size``; halve the chunk on out-of-memory."""
    parts: list[FitResult] = []
    start = 0
    bar = _progress(total, show_progress)
    while start < total:
        stop = min(start + size, total)
        try:
            parts.append(solve_chunk(slice(start, stop)))
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or size == 1:
                raise
            size = max(1, size // 2)
            continue
        if bar is not None:
            bar.update(stop - start)
        start = stop
    if bar is not None:
        bar.close()
    return FitResult.concat(parts)


def _progress(total: int, show: bool) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="fits", unit="fit")


def _truth_vector(model: MixtureModel, truth: Params | None, B: int, n_starts: int, dev: torch.device,
                  dt: torch.dtype) -> tuple[MixtureModel | None, torch.Tensor | None]:
    if truth is None:
        return None, None
    if not isinstance(truth, dict) or "beta0" not in truth:
        raise ValueError("truth must be a parameter container with a 'beta0' entry")
    truth_model = model.with_atoms(int(truth["beta0"].shape[-1]))
    tb = truth_model.batch_shape(truth)
    vec = truth_model.flatten(truth_model.cast(truth, device=dev, dtype=dt))
    if tb == torch.Size([]):
        vec = vec.expand(B, -1)
    elif tb != torch.Size([B]):
        raise ValueError(f"truth has batch shape {tuple(tb)}; expected () or ({B},)")
    return truth_model, vec.repeat_interleave(n_starts, dim=0)


def _solve(problem: Problem, theta0: torch.Tensor, seeds: list[np.random.SeedSequence],
           o: dict[str, Any]) -> SolverOutput:
    if o["method"] == "lm":
        kw = dict(max_iter=o["max_iter"], ftol=o["ftol"], xtol=o["xtol"], gtol=o["gtol"])
        threads = worker_threads(o["workers"], *problem.y.shape)
        if threads > 1:
            return solve_lm_in_threads(problem, theta0, threads, **kw)
        return solve_lm(problem, theta0, **kw)
    if o["method"] == "adam":
        return solve_adam(problem, theta0, max_iter=o["max_iter"], ftol=o["ftol"], gtol=o["gtol"],
                          lr=1e-2 if o["lr"] is None else o["lr"])
    return solve_sgd_paper(problem, theta0, seeds=seeds, gtol=o["gtol"], epochs=o["epochs"],
                           lr=0.1 if o["lr"] is None else o["lr"], batch_size=o["batch_size"])


def fit_multistart(
    model: MixtureModel,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    n_starts: int,
    init: Params | None = None,
    seed: SeedLike = 0,
    bounds: Bounds | Mapping[str, tuple[float, float]] | None = None,
    scale: float = 1.0,
    **kwargs: Any,
) -> FitResult:
    """Best of ``n_starts`` fits per data set, all ``B * n_starts`` fits batched together.

    ``init`` (batch ``(B, n_starts)``) gives the starts; without it they are drawn by
    :func:`~hmoe_sim.estimators.init.init_random` from ``seed`` and ``scale``. Other keyword
    arguments go to :func:`fit_batch`. ``FitResult.start`` tells which start was kept.
    """
    m = check_positive_int("n_starts", n_starts)
    X = check_float_tensor("X", X)
    if X.dim() != 3:
        raise ValueError(f"X has shape {tuple(X.shape)}; expected (B, n, D)")
    box = as_bounds(bounds)
    if init is None:
        init = init_random(model, batch_shape=(X.shape[0], m), bounds=box, seed=seed, scale=scale,
                           dtype=X.dtype, device=X.device)
    elif tuple(model.batch_shape(init)) != (X.shape[0], m):
        raise ValueError(f"init has batch shape {tuple(model.batch_shape(init))}; expected ({X.shape[0]}, {m})")
    return fit_batch(model, X, y, init, bounds=box, **kwargs)


