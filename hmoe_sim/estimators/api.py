"""Public interface: ``fit_batch``, ``fit_multistart``, :class:`FitResult` and the estimators."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
import torch

from hmoe_sim._validation import check_choice, check_float_tensor, check_positive_int
from hmoe_sim.data import SeedLike
from hmoe_sim.devices import resolve_device, resolve_dtype
from hmoe_sim.estimators._core import Problem, SolverOutput, projected_gradient, risk_and_gradient
from hmoe_sim.estimators._first_order import solve_adam, solve_sgd_paper
from hmoe_sim.estimators._lm import solve_lm
from hmoe_sim.estimators.bounds import Bounds
from hmoe_sim.estimators.init import init_random
from hmoe_sim.models.base import MixtureModel, Params

__all__ = [
    "ConvergenceWarning",
    "FitResult",
    "GaussianMLE",
    "LeastSquaresMoE",
    "METHODS",
    "auto_chunk_size",
    "fit_batch",
    "fit_multistart",
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


class ConvergenceWarning(UserWarning):
    """Some fits stopped without meeting a convergence test (see the certificate)."""


@dataclass
class FitResult:
    """Fitted parameters and the per-fit certificate.

    Every certificate field is a ``(B,)`` tensor on the fitting device.

    Attributes
    ----------
    params : dict of torch.Tensor
        Fitted container with batch shape ``(B,)``.
    n_iter : iterations (LM, Adam) or SGD steps.
    grad_norm : sup-norm of the projected gradient of the empirical risk at the fit.
    rel_change : relative change of the objective at the last (accepted) step or epoch.
    converged : a convergence test was met (ftol, xtol or gtol for LM; gtol otherwise).
    on_boundary : some coordinate lies within tolerance of the box.
    diverged : non-finite data, objective or Jacobian: this fit stopped, the others went on.
    risk : empirical risk ``RSS / n`` at the fit.
    risk_truth : empirical risk of the truth on the same data (NaN without a truth).
    noise_var : ``RSS / n``, the Gaussian MLE of the noise variance.
    loglik : Gaussian log-likelihood at ``noise_var``: ``-n/2 (log(2 pi noise_var) + 1)``.
    n : samples of each data set.
    start : index of the start kept by a multi-start fit (0 otherwise).
    method : solver name.
    boundary_params : list of list of str
        Per fit, the parameter tensors with an entry at a bound, as sorted labels
        ``"name:lo"`` / ``"name:hi"`` (e.g. ``["beta0:lo"]``); empty for a fit inside the box
        (:meth:`Bounds.boundary_params`). Non-empty exactly when ``on_boundary`` is set.
    """

    params: Params
    n_iter: torch.Tensor
    grad_norm: torch.Tensor
    rel_change: torch.Tensor
    converged: torch.Tensor
    on_boundary: torch.Tensor
    diverged: torch.Tensor
    risk: torch.Tensor
    risk_truth: torch.Tensor
    noise_var: torch.Tensor
    loglik: torch.Tensor
    n: torch.Tensor
    start: torch.Tensor
    method: str = "lm"
    boundary_params: list[list[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.risk.shape[0])

    def _fields(self) -> list[str]:
        return [f.name for f in fields(self) if f.name not in ("params", "method", "boundary_params")]

    def certificate_frame(self) -> pd.DataFrame:
        """One row per fit: ``fit`` index, the certificate fields, ``method`` and
        ``boundary_params`` (the labels joined by ``","``, ``""`` inside the box)."""
        data: dict[str, Any] = {"fit": np.arange(len(self))}
        for name in self._fields():
            data[name] = getattr(self, name).detach().cpu().numpy()
        data["method"] = self.method
        data["boundary_params"] = [",".join(labels) for labels in self._labels()]
        return pd.DataFrame(data)

    def _labels(self) -> list[list[str]]:
        """``boundary_params``, or empty lists for a result built without it."""
        return self.boundary_params if len(self.boundary_params) == len(self) else [[] for _ in range(len(self))]

    @staticmethod
    def concat(parts: Sequence[FitResult]) -> FitResult:
        """Stack results of consecutive chunks along the batch axis."""
        first = parts[0]
        params = {k: torch.cat([p.params[k] for p in parts]) for k in first.params}
        stacked = {name: torch.cat([getattr(p, name) for p in parts]) for name in first._fields()}
        labels = [labels for p in parts for labels in p._labels()]
        return FitResult(params=params, method=first.method, boundary_params=labels, **stacked)


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
    itemsize = torch.empty((), dtype=dtype).element_size()
    copies = _ANALYTIC_JACOBIAN_COPIES if analytic else _JACOBIAN_COPIES
    per_problem = copies * n * max(n_params, 1) * itemsize
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


def _as_bounds(bounds: Bounds | Mapping[str, tuple[float, float]] | None) -> Bounds:
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
            raise ValueError(f"got {len(seed)} seeds for {count} data sets")
        return [s if isinstance(s, np.random.SeedSequence) else np.random.SeedSequence(int(s)) for s in seed]
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))  # type: ignore[arg-type]
    return [np.random.SeedSequence(root.entropy, spawn_key=(*root.spawn_key, b)) for b in range(count)]


def _check_data(model: MixtureModel, X: object, y: object, mask: object) -> tuple[torch.Tensor, ...]:
    X = check_float_tensor("X", X)
    y = check_float_tensor("y", y)
    if X.dim() != 3 or X.shape[-1] != model.input_dim:
        raise ValueError(f"X has shape {tuple(X.shape)}; expected (B, n, {model.input_dim})")
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
    return X, y, mask


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
    """
    if not isinstance(model, MixtureModel):
        raise TypeError(f"model must be a MixtureModel, got {type(model).__name__}")
    check_choice("method", method, METHODS)
    check_choice("loss", loss, LOSSES)
    max_iter = check_positive_int("max_iter", max_iter)
    if not (isinstance(tol, int | float) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    X, y, mask = _check_data(model, X, y, mask)
    dev = X.device if device is None else resolve_device(device)
    dt = X.dtype if dtype is None else resolve_dtype(dtype)
    box = _as_bounds(bounds)
    box.check_names(model)
    B = X.shape[0]
    batch = model.batch_shape(init)
    if batch not in (torch.Size([B]),) and not (len(batch) == 2 and batch[0] == B):
        raise ValueError(f"init has batch shape {tuple(batch)}; expected ({B},) or ({B}, m) to match X")
    n_starts = 1 if len(batch) == 1 else int(batch[1])
    X, y, mask = X.to(dev, dt), y.to(dev, dt), mask.to(dev)
    theta0 = model.flatten(model.cast(init, device=dev, dtype=dt)).reshape(B * n_starts, -1)
    if n_starts > 1:
        X = X.repeat_interleave(n_starts, dim=0)
        y = y.repeat_interleave(n_starts, dim=0)
        mask = mask.repeat_interleave(n_starts, dim=0)
    eps = torch.finfo(dt).eps
    floor = lambda v: max(tol if v is None else float(v), 4 * eps)  # noqa: E731
    options = dict(method=method, max_iter=max_iter, ftol=floor(ftol), xtol=floor(xtol), gtol=floor(gtol),
                   lr=lr, epochs=check_positive_int("epochs", epochs),
                   batch_size=check_positive_int("batch_size", batch_size))
    seeds = _seed_list(seed, B)
    if n_starts > 1:
        seeds = [s for s in seeds for _ in range(n_starts)]
    truth_model, truth_theta = _truth_vector(model, truth, B, n_starts, dev, dt)
    lo, hi = box.vectors(model, dtype=dt, device=dev)
    weight = mask.to(dt)
    X = torch.where(mask.unsqueeze(-1), X, torch.zeros((), dtype=dt, device=dev))
    y = torch.where(mask, y, torch.zeros((), dtype=dt, device=dev))
    total = X.shape[0]
    analytic = hasattr(model, "value_and_jacobian")
    size = auto_chunk_size(X.shape[1], model.n_params, dt, dev, analytic=analytic, max_memory=max_memory) \
        if chunk_size is None else check_positive_int("chunk_size", chunk_size)
    parts: list[FitResult] = []
    start = 0
    bar = _progress(total, show_progress)
    while start < total:
        stop = min(start + size, total)
        sl = slice(start, stop)
        problem = Problem(model, X[sl], y[sl], weight[sl], weight[sl].sum(-1), lo, hi)
        try:
            out = _solve(problem, theta0[sl], seeds[sl], options)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or size == 1:
                raise
            size = max(1, size // 2)
            continue
        t_theta = None if truth_theta is None else truth_theta[sl]
        parts.append(_certificate(problem, out, box, truth_model, t_theta, method))
        if bar is not None:
            bar.update(stop - start)
        start = stop
    if bar is not None:
        bar.close()
    result = FitResult.concat(parts)
    return _best_of_starts(result, B, n_starts) if n_starts > 1 else result


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
        return solve_lm(problem, theta0, max_iter=o["max_iter"], ftol=o["ftol"], xtol=o["xtol"], gtol=o["gtol"])
    if o["method"] == "adam":
        return solve_adam(problem, theta0, max_iter=o["max_iter"], ftol=o["ftol"], gtol=o["gtol"],
                          lr=1e-2 if o["lr"] is None else o["lr"])
    return solve_sgd_paper(problem, theta0, seeds=seeds, gtol=o["gtol"], epochs=o["epochs"],
                           lr=0.1 if o["lr"] is None else o["lr"], batch_size=o["batch_size"])


def _certificate(problem: Problem, out: SolverOutput, box: Bounds, truth_model: MixtureModel | None,
                 truth_theta: torch.Tensor | None, method: str) -> FitResult:
    theta = out.theta
    risk, grad = risk_and_gradient(problem, theta)
    grad_norm = projected_gradient(grad, theta, problem.lo, problem.hi).abs().amax(-1)
    diverged = out.diverged | ~torch.isfinite(risk) | ~torch.isfinite(theta).all(-1)
    nan = torch.full_like(risk, float("nan"))
    if truth_model is None or truth_theta is None:
        risk_truth = nan
    else:
        f = truth_model.predict(truth_model.unflatten(truth_theta), problem.X, check=False)
        risk_truth = (problem.weight * (problem.y - f)).square().sum(-1) / problem.n_eff
    n = problem.n_eff
    loglik = -0.5 * n * (torch.log(2 * math.pi * risk) + 1)
    return FitResult(
        params=problem.model.unflatten(theta.contiguous()), n_iter=out.n_iter, grad_norm=grad_norm,
        rel_change=out.rel_change, converged=out.converged & ~diverged,
        on_boundary=box.near_boundary(theta, problem.lo, problem.hi), diverged=diverged, risk=risk,
        risk_truth=risk_truth, noise_var=risk, loglik=loglik, n=n,
        start=torch.zeros_like(out.n_iter), method=method,
        boundary_params=box.boundary_params(problem.model, theta, problem.lo, problem.hi))


def _best_of_starts(result: FitResult, B: int, m: int) -> FitResult:
    """Keep, per data set, the non-diverged start of least risk (start 0 if all diverged)."""
    score = torch.where(result.diverged | torch.isnan(result.risk), torch.full_like(result.risk, math.inf),
                        result.risk).reshape(B, m)
    best = score.argmin(-1)
    flat = torch.arange(B, device=best.device) * m + best
    params = {k: v[flat] for k, v in result.params.items()}
    picked = {name: getattr(result, name)[flat] for name in result._fields()}
    picked["start"] = best
    labels = result._labels()
    return FitResult(params=params, method=result.method, boundary_params=[labels[i] for i in flat.tolist()],
                     **picked)


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
    box = _as_bounds(bounds)
    if init is None:
        init = init_random(model, batch_shape=(X.shape[0], m), bounds=box, seed=seed, scale=scale,
                           dtype=X.dtype, device=X.device)
    elif tuple(model.batch_shape(init)) != (X.shape[0], m):
        raise ValueError(f"init has batch shape {tuple(model.batch_shape(init))}; expected ({X.shape[0]}, {m})")
    return fit_batch(model, X, y, init, bounds=box, **kwargs)


class LeastSquaresMoE:
    """Least-squares estimator of a mixture's parameters, in scikit-learn style.

    Parameters
    ----------
    model : MixtureModel
        The fitted model.
    method, bounds, max_iter, tol, device, dtype, chunk_size
        As in :func:`fit_batch`.
    n_starts : int
        Random starts per data set when ``fit`` gets no ``init`` (best kept).
    random_state : int or SeedSequence
        Seed of the random starts (and of the SGD permutations).
    init_scale : float
        Random starts are uniform on the box intersected with ``[-init_scale, init_scale]``.
    fit_options : dict, optional
        Further keyword arguments of :func:`fit_batch` (``lr``, ``epochs``, ...).

    Attributes
    ----------
    result_ : FitResult
    params_ : dict of torch.Tensor
        Fitted parameters (unbatched when ``fit`` got one data set ``X (n, D)``).
    converged_, n_iter_, grad_norm_, rel_change_, on_boundary_, diverged_, risk_, risk_truth_
        Certificate fields (scalars for one data set, ``(B,)`` arrays for a batch).
    boundary_params_ : list of str, or list of list of str for a batch
        Parameters with an entry at a bound (``"name:lo"`` / ``"name:hi"``).
    """

    _loss = "ls"
    _attributes = ("converged", "n_iter", "grad_norm", "rel_change", "on_boundary", "diverged", "risk",
                   "risk_truth", "start")

    def __init__(self, model: MixtureModel, *, method: str = "lm",
                 bounds: Bounds | Mapping[str, tuple[float, float]] | None = None, max_iter: int = 200,
                 tol: float = 1e-10, n_starts: int = 1, random_state: SeedLike = 0, init_scale: float = 1.0,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 chunk_size: int | None = None, fit_options: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.method = method
        self.bounds = bounds
        self.max_iter = max_iter
        self.tol = tol
        self.n_starts = n_starts
        self.random_state = random_state
        self.init_scale = init_scale
        self.device = device
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.fit_options = fit_options

    def fit(self, X: torch.Tensor, y: torch.Tensor, init: Params | None = None, *,
            mask: torch.Tensor | None = None, truth: Params | None = None) -> LeastSquaresMoE:
        """Fit one data set (``X (n, D)``, ``y (n,)``) or a batch (``X (B, n, D)``, ``y (B, n)``).

        ``init`` has batch shape ``()`` / ``(m,)`` for one data set and ``(B,)`` / ``(B, m)``
        for a batch; without it ``n_starts`` random starts are drawn from ``random_state``.
        Emits :class:`ConvergenceWarning` when a fit did not converge or diverged.
        """
        X = check_float_tensor("X", X)
        single = X.dim() == 2
        if single:
            X, y = X.unsqueeze(0), check_float_tensor("y", y).unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
            if init is not None:
                init = {k: v.unsqueeze(0) for k, v in init.items()}
        if init is None:
            m = check_positive_int("n_starts", self.n_starts)
            shape = (X.shape[0], m) if m > 1 else (X.shape[0],)
            init = init_random(self.model, batch_shape=shape, bounds=_as_bounds(self.bounds),
                               seed=self.random_state, scale=self.init_scale, dtype=X.dtype, device=X.device)
        options = dict(self.fit_options or {})
        options.setdefault("seed", self.random_state if not isinstance(self.random_state, np.random.Generator)
                           else 0)
        result = fit_batch(self.model, X, y, init, method=self.method, bounds=self.bounds,
                           max_iter=self.max_iter, tol=self.tol, device=self.device, dtype=self.dtype,
                           chunk_size=self.chunk_size, truth=truth, loss=self._loss, mask=mask, **options)
        self.result_ = result
        unpack = (lambda t: t[0].item()) if single else (lambda t: t.detach().cpu().numpy())  # noqa: E731
        self.params_ = {k: v[0] for k, v in result.params.items()} if single else result.params
        for name in self._attributes + self._extra_attributes():
            setattr(self, name + "_", unpack(getattr(result, name)))
        self.boundary_params_ = result.boundary_params[0] if single else result.boundary_params
        bad = int((~result.converged).sum())
        if bad:
            warnings.warn(f"{bad} of {len(result)} fit(s) did not converge (method={self.method!r}, "
                          f"max_iter={self.max_iter}); see result_.certificate_frame()",
                          ConvergenceWarning, stacklevel=2)
        return self

    def _extra_attributes(self) -> tuple[str, ...]:
        return ()

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Fitted regression function at ``X`` (``(n, D)`` or ``(B, n, D)``)."""
        if not hasattr(self, "params_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit first")
        params = self.model.cast(self.params_, device=X.device, dtype=X.dtype)
        return self.model.predict(params, X)

    def certificate_frame(self) -> pd.DataFrame:
        """The per-fit certificate table of the last ``fit``."""
        if not hasattr(self, "result_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit first")
        return self.result_.certificate_frame()


class GaussianMLE(LeastSquaresMoE):
    """Gaussian maximum likelihood with unknown noise variance.

    The mean parameters are the least-squares fit; additionally ``noise_var_`` (``RSS/n``)
    and ``loglik_`` (``-n/2 (log(2 pi noise_var) + 1)``) are set.
    """

    _loss = "mle"

    def _extra_attributes(self) -> tuple[str, ...]:
        return ("noise_var", "loglik")
