"""Batched least-squares and Gaussian-MLE estimators (CPU and CUDA, float32 and float64).

``fit_batch`` fits many independent data sets at once (projected Levenberg-Marquardt by
default, Adam, or the sibling papers' minibatch SGD) inside a box ``Theta`` and returns a
:class:`FitResult` with a certificate per fit. Modules: :mod:`.api` (``fit_batch``,
``fit_multistart``), :mod:`.result` (``FitResult``, certificates, best of starts),
:mod:`.sklearn` (scikit-learn-style estimators), :mod:`.init` (starts), :mod:`.bounds`.
"""

from hmoe_sim.estimators.api import METHODS, as_bounds, auto_chunk_size, fit_batch, fit_multistart, jacobian_bytes
from hmoe_sim.estimators.bounds import DEFAULT_BOUND, Bounds
from hmoe_sim.estimators.init import PAPER_NOISE, init_near_truth, init_paper, init_random, split_atoms
from hmoe_sim.estimators.result import ConvergenceWarning, FitResult, best_of_starts
from hmoe_sim.estimators.sklearn import GaussianMLE, LeastSquaresMoE

__all__ = [
    "DEFAULT_BOUND",
    "METHODS",
    "PAPER_NOISE",
    "Bounds",
    "ConvergenceWarning",
    "FitResult",
    "GaussianMLE",
    "LeastSquaresMoE",
    "as_bounds",
    "auto_chunk_size",
    "best_of_starts",
    "fit_batch",
    "fit_multistart",
    "init_near_truth",
    "init_paper",
    "init_random",
    "jacobian_bytes",
    "split_atoms",
]
