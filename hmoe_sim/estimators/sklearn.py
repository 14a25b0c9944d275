"""scikit-learn-style estimators: :class:`LeastSquaresMoE` and :class:`GaussianMLE`.

``__init__`` stores hyperparameters only; ``fit`` returns ``self`` and sets fitted attributes
ending in ``_``; a :class:`~hmoe_sim.estimators.result.ConvergenceWarning` is emitted when a
fit did not converge.
"""

from __future__ import annotations

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
