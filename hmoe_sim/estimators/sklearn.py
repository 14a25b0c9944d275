"""scikit-learn-style estimators: :class:`LeastSquaresMoE` and :class:`GaussianMLE`.

``__init__`` stores hyperparameters only; ``fit`` returns ``self`` and sets fitted attributes
ending in ``_``; a :class:`~hmoe_sim.estimators.result.ConvergenceWarning` is emitted when a
fit did not converge. They follow scikit-learn's estimator contract without depending on it
(scikit-learn is optional): ``get_params`` / ``set_params`` (``deep``, nested ``name__key``),
a ``__repr__`` of the parameters that differ from their defaults, ``score`` (the coefficient of
determination, as scikit-learn's regressors) and ``__sklearn_tags__`` (a regressor), so that
``sklearn.base.clone``, grid searches and pipelines take them.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from hmoe_sim._validation import check_float_tensor, check_positive_int
from hmoe_sim.data import SeedLike
from hmoe_sim.estimators.api import as_bounds, fit_batch
from hmoe_sim.estimators.bounds import Bounds
from hmoe_sim.estimators.init import init_random
from hmoe_sim.estimators.result import ConvergenceWarning
from hmoe_sim.models.base import MixtureModel, Params

__all__ = ["GaussianMLE", "LeastSquaresMoE"]


def _same(value: object, default: object) -> bool:
    """Whether ``value`` is the default (by identity, or equal plain value of the same type)."""
    if value is default:
        return True
    plain = (bool, int, float, str, type(None))
    return type(value) is type(default) and isinstance(value, plain) and value == default


class _EstimatorContract:
    """scikit-learn's estimator contract over the ``__init__`` parameters, stored as attributes of the same name."""

    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [p.name for p in signature.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The estimator's parameters (``deep``: also ``name__key`` of parameters that have ``get_params``)."""
        out: dict[str, Any] = {}
        for name in self._param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                out.update((f"{name}__{key}", v) for key, v in value.get_params().items())
            out[name] = value
        return out

    def set_params(self, **params: Any) -> Any:
        """Set parameters (``name`` or nested ``name__key``); returns ``self``.

        Raises
        ------
        ValueError
            An unknown parameter name (the message lists the valid ones).
        """
        names = self._param_names()
        nested: dict[str, dict[str, Any]] = {}
        for key, value in params.items():
            name, delimiter, sub = key.partition("__")
            if name not in names:
                raise ValueError(f"invalid parameter {name!r} for estimator {type(self).__name__}; valid parameters: "
                                 f"{names}")
            if delimiter:
                nested.setdefault(name, {})[sub] = value
            else:
                setattr(self, name, value)
        for name, sub_params in nested.items():
            getattr(self, name).set_params(**sub_params)
        return self

    def __repr__(self) -> str:
        signature = inspect.signature(type(self).__init__)
        shown = [f"{name}={getattr(self, name)!r}" for name in self._param_names()
                 if signature.parameters[name].default is inspect.Parameter.empty
                 or not _same(getattr(self, name), signature.parameters[name].default)]
        return f"{type(self).__name__}({', '.join(shown)})"

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's tags (called by scikit-learn only): a regressor of tensors that needs ``y``."""
        from sklearn.utils import InputTags, RegressorTags, Tags, TargetTags

        return Tags(estimator_type="regressor", target_tags=TargetTags(required=True),
                    regressor_tags=RegressorTags(), input_tags=InputTags())


class LeastSquaresMoE(_EstimatorContract):
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
            init = init_random(self.model, batch_shape=shape, bounds=as_bounds(self.bounds),
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

    def score(self, X: torch.Tensor, y: torch.Tensor) -> float:
        """The coefficient of determination ``1 - RSS / TSS`` of the fitted function on ``(X (n, D), y (n,))``
        (the score of scikit-learn's regressors, used by its model selection)."""
        y = check_float_tensor("y", y)
        fitted = self.predict(check_float_tensor("X", X)).to(y.dtype)
        residual = (y - fitted).square().sum()
        total = (y - y.mean()).square().sum()
        return float(1.0 - residual / total)

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
