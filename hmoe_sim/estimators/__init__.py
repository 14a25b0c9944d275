"""Batched least-squares and Gaussian-MLE estimators (CPU and CUDA, float32 and float64).

``fit_batch`` fits many independent data sets at once (projected Levenberg-Marquardt by
default, Adam, or the sibling papers' minibatch SGD) inside a box ``Theta`` and returns a
:class:`FitResult` with a certificate per fit.
"""

from hmoe_sim.estimators.api import (
    METHODS,
    ConvergenceWarning,
    FitResult,
    GaussianMLE,
    LeastSquaresMoE,
    auto_chunk_size,
    fit_batch,
    fit_multistart,
)
from hmoe_sim.estimators.bounds import DEFAULT_BOUND, Bounds
from hmoe_sim.estimators.init import PAPER_NOISE, init_near_truth, init_paper, init_random, split_atoms

__all__ = [
    "DEFAULT_BOUND",
    "METHODS",
    "PAPER_NOISE",
    "Bounds",
    "ConvergenceWarning",
    "FitResult",
    "GaussianMLE",
    "LeastSquaresMoE",
    "auto_chunk_size",
    "fit_batch",
    "fit_multistart",
    "init_near_truth",
    "init_paper",
    "init_random",
    "split_atoms",
]
