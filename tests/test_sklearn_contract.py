"""The scikit-learn estimator contract of LeastSquaresMoE and GaussianMLE: get_params/set_params, clone,
repr, and grid search; scikit-learn's own checks of the contract where it is installed."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hmoe_sim import make_preset, sample_batch
from hmoe_sim.estimators import Bounds, GaussianMLE, LeastSquaresMoE
from hmoe_sim.estimators.result import ConvergenceWarning

ESTIMATORS = [LeastSquaresMoE, GaussianMLE]
NAMES = ["model", "method", "bounds", "max_iter", "tol", "n_starts", "random_state", "init_scale", "device", "dtype",
         "chunk_size", "fit_options"]


def _model():
    return make_preset("softmax-linear", seed=0).fit_model


def _data(n: int = 240):
    setup = make_preset("softmax-linear", seed=0)
    X, y = sample_batch(setup.true_model, setup.truth, n, setup.noise_std, [np.random.SeedSequence(3)])
    return setup, X[0], y[0]


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_get_params_returns_every_init_argument_as_given(cls):
    model, box = _model(), Bounds(default=(-4.0, 4.0))
    est = cls(model, bounds=box, max_iter=7, n_starts=3, fit_options={"lr": 0.1})
    params = est.get_params()
    assert list(params) == NAMES
    assert params["model"] is model and params["bounds"] is box and params["max_iter"] == 7
    assert params["fit_options"] == {"lr": 0.1} and params["method"] == "lm"
    assert est.get_params(deep=False) == params  # nothing nested: the model is no estimator


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_set_params_sets_and_returns_self_and_refuses_unknown_names(cls):
    est = cls(_model())
    assert est.set_params(max_iter=3, tol=1e-6) is est
    assert (est.max_iter, est.tol) == (3, 1e-6) and est.get_params()["max_iter"] == 3
    with pytest.raises(ValueError, match=r"max_iters.*max_iter"):
        est.set_params(max_iters=3)


class _Wrapper:
    """A minimal object with get_params/set_params, to check deep parameters."""

    def __init__(self, inner=None, alpha: float = 1.0) -> None:
        self.inner, self.alpha = inner, alpha

    def get_params(self, deep: bool = True):
        return {"inner": self.inner, "alpha": self.alpha}

    def set_params(self, **params):
        for k, v in params.items():
            setattr(self, k, v)
        return self


def test_deep_params_reach_nested_parameter_objects():
    est = LeastSquaresMoE(_model(), fit_options=None)
    est.set_params(bounds=_Wrapper(alpha=2.0))
    deep = est.get_params(deep=True)
    assert deep["bounds__alpha"] == 2.0 and "bounds__alpha" not in est.get_params(deep=False)
    est.set_params(bounds__alpha=5.0, max_iter=9)
    assert est.bounds.alpha == 5.0 and est.max_iter == 9


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_repr_names_the_class_and_the_parameters_that_differ_from_their_defaults(cls):
    model = _model()
    text = repr(cls(model, max_iter=7, method="adam"))
    assert text.startswith(f"{cls.__name__}(model={model!r}") and "max_iter=7" in text and "method='adam'" in text
    assert "tol=" not in text and "n_starts=" not in text


@pytest.mark.parametrize("cls", ESTIMATORS)
def test_sklearn_clone_gives_an_unfitted_copy_with_the_same_parameters(cls):
    base = pytest.importorskip("sklearn.base")
    setup, X, y = _data()
    est = cls(setup.fit_model, max_iter=3, n_starts=2, random_state=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    twin = base.clone(est)
    assert type(twin) is cls and not hasattr(twin, "params_")
    assert twin.get_params().keys() == est.get_params().keys()
    assert all(twin.get_params()[k] == v for k, v in est.get_params().items() if k != "model")
    assert repr(twin.model) == repr(est.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        twin.fit(X, y)
    torch.testing.assert_close(twin.params_, est.params_, rtol=0, atol=0)  # same seed, same fit


def test_grid_search_over_a_hyperparameter_matches_a_loop_over_the_folds():
    pytest.importorskip("sklearn")
    from sklearn.model_selection import GridSearchCV, KFold

    setup, X, y = _data(400)
    grid = [1, 5, 60]
    search = GridSearchCV(LeastSquaresMoE(setup.fit_model, n_starts=2, random_state=1), {"max_iter": grid},
                          cv=KFold(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(X, y)
        by_hand = []
        for max_iter in grid:  # the same folds, fitted and scored in a plain loop
            scores = []
            for train, test in KFold(2).split(X.numpy()):
                est = LeastSquaresMoE(setup.fit_model, n_starts=2, random_state=1, max_iter=max_iter)
                scores.append(est.fit(X[train], y[train]).score(X[test], y[test]))
            by_hand.append(np.mean(scores))
    np.testing.assert_allclose(search.cv_results_["mean_test_score"], by_hand, rtol=1e-12)
    best = grid[int(np.argmax(by_hand))]
    assert search.best_params_ == {"max_iter": best}
    assert isinstance(search.best_estimator_, LeastSquaresMoE) and search.best_estimator_.max_iter == best
    assert search.score(X, y) == pytest.approx(search.best_estimator_.score(X, y))


def test_score_is_the_coefficient_of_determination():
    setup, X, y = _data()
    est = LeastSquaresMoE(setup.fit_model, max_iter=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X, y)
    residual = (y - est.predict(X)).square().sum()
    total = (y - y.mean()).square().sum()
    assert est.score(X, y) == pytest.approx(float(1 - residual / total), rel=1e-12)


#: every check of scikit-learn's check_estimator that does not fit data (those pass NumPy, sparse or list
#: inputs of their own width; these estimators take torch tensors whose width the required model fixes)
CONTRACT_CHECKS = ["check_estimator_cloneable", "check_estimator_tags_renamed", "check_valid_tag_types",
                   "check_estimator_repr", "check_no_attributes_set_in_init",
                   "check_do_not_raise_errors_in_init_or_set_params", "check_mixin_order",
                   "check_parameters_default_constructible", "check_get_params_invariance", "check_set_params"]


@pytest.mark.parametrize("check", CONTRACT_CHECKS)
@pytest.mark.parametrize("cls", ESTIMATORS)
def test_the_contract_checks_of_scikit_learn_pass(cls, check):
    checks = pytest.importorskip("sklearn.utils.estimator_checks")
    getattr(checks, check)(cls.__name__, cls(_model()))


def test_the_contract_needs_no_scikit_learn():
    """scikit-learn is optional: with it unimportable, get_params/set_params/repr work (tags are scikit-learn's)."""
    code = ("import sys; sys.modules['sklearn'] = None\n"
            "from hmoe_sim import make_preset\nfrom hmoe_sim.estimators import GaussianMLE\n"
            "est = GaussianMLE(make_preset('softmax-linear').fit_model).set_params(max_iter=3)\n"
            "assert est.get_params()['max_iter'] == 3 and 'max_iter=3' in repr(est)\nprint('ok')\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
