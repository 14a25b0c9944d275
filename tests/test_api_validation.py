"""The library API validates its arguments like the config layer (issue 20, item 4).

Every bad input raises ``ValueError`` or ``TypeError`` with one message that names the
argument and the bad value; valid calls still work.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hmoe_sim import make_preset, sample_batch
from hmoe_sim._validation import check_number, check_seed
from hmoe_sim.estimators.api import fit_batch
from hmoe_sim.estimators.init import init_near_truth, init_paper, init_random
from hmoe_sim.losses import l2_error, voronoi_loss

PRESET = "sigmoid-regime1"


@pytest.fixture(scope="module")
def setup():
    s = make_preset(PRESET, seed=0, input_dim=2, n_true=2, n_fit=3)
    X, y = sample_batch(s.true_model, s.truth, 30, s.noise_std,
                        [np.random.SeedSequence([0, b]) for b in range(2)])
    init = init_near_truth(s.fit_model, s.true_model, s.truth, batch_shape=(2,), seed=1)
    return s, X, y, init


def _raises(err: type[Exception], match: tuple[str, ...], fn, *args, **kwargs) -> str:
    with pytest.raises(err) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    for part in match:
        assert part in message, f"{part!r} not in {message!r}"
    return message


# ------------------------------------------------------------------ helpers
@pytest.mark.parametrize(("value", "kwargs", "err"), [
    (math.inf, dict(minimum=0.0, strict=True), ValueError),
    (math.nan, dict(minimum=0.0), ValueError),
    (-math.inf, dict(allow_inf=True), ValueError),
    (0.0, dict(minimum=0.0, strict=True), ValueError),
    (-1, dict(minimum=0.0), ValueError),
    ("1", {}, TypeError),
    (True, {}, TypeError),
])
def test_check_number_rejects(value, kwargs, err):
    _raises(err, ("x must be", repr(value)), check_number, "x", value, **kwargs)


def test_check_number_accepts():
    assert check_number("x", 0, minimum=0.0) == 0.0
    assert check_number("x", math.inf, minimum=0.0, strict=True, allow_inf=True) == math.inf
    assert check_number("x", np.float32(2.5)) == 2.5


@pytest.mark.parametrize("value", [-1, 1.5, "3", True, None])
def test_check_seed_rejects(value):
    _raises(ValueError, ("seed", repr(value)), check_seed, "seed", value)


def test_check_seed_accepts():
    for value in (0, 7, np.int64(3), np.random.SeedSequence(1), np.random.default_rng(2)):
        assert check_seed("seed", value) is value


# ------------------------------------------------------------------ fit_batch
FIT_BAD = [
    ("tol", math.inf, ValueError),
    ("tol", math.nan, ValueError),
    ("tol", 0.0, ValueError),
    ("tol", -1e-3, ValueError),
    ("tol", "1e-8", TypeError),
    ("xtol", math.inf, ValueError),
    ("ftol", math.nan, ValueError),
    ("gtol", -1.0, ValueError),
    ("max_iter", 0, ValueError),
    ("max_iter", -5, ValueError),
    ("max_iter", 2.5, TypeError),
    ("max_iter", math.nan, TypeError),
    ("epochs", 0, ValueError),
    ("batch_size", -1, ValueError),
    ("chunk_size", 0, ValueError),
    ("method", "newton", ValueError),
    ("loss", "l1", ValueError),
    ("seed", -1, ValueError),
    ("seed", 1.5, ValueError),
]


@pytest.mark.parametrize(("name", "value", "err"), FIT_BAD, ids=[f"{n}={v!r}" for n, v, _ in FIT_BAD])
def test_fit_batch_rejects_option(setup, name, value, err):
    s, X, y, init = setup
    kwargs = {"max_iter": 2, name: value}
    _raises(err, (name, repr(value)), fit_batch, s.fit_model, X, y, init, **kwargs)


@pytest.mark.parametrize("lr", [-1.0, 0.0, math.inf, math.nan])
@pytest.mark.parametrize("method", ["adam", "sgd-paper"])
def test_fit_batch_rejects_learning_rate(setup, method, lr):
    s, X, y, init = setup
    _raises(ValueError, ("lr", repr(lr)), fit_batch, s.fit_model, X, y, init, method=method, lr=lr, max_iter=2)


def test_fit_batch_rejects_seed_entry(setup):
    s, X, y, init = setup
    _raises(ValueError, ("seed[1]", "-3"), fit_batch, s.fit_model, X, y, init, seed=[0, -3], max_iter=2)


def test_fit_batch_rejects_empty_batch(setup):
    s, X, y, init = setup
    empty = {k: v[:0] for k, v in init.items()}
    _raises(ValueError, ("X", "(0, 30, 2)", "non-empty"), fit_batch, s.fit_model, X[:0], y[:0], empty)
    _raises(ValueError, ("X", "(2, 0, 2)", "non-empty"), fit_batch, s.fit_model, X[:, :0], y[:, :0], init)


def test_fit_batch_rejects_meta_tensor(setup):
    s, X, y, init = setup
    _raises(ValueError, ("X", "meta"), fit_batch, s.fit_model, X.to("meta"), y, init)


@pytest.mark.parametrize(("which", "shape"), [("X", (2, 30, 3)), ("y", (3, 30)), ("y", (2, 29))])
def test_fit_batch_rejects_shape_mismatch(setup, which, shape):
    s, X, y, init = setup
    bad = torch.zeros(shape, dtype=torch.float64)
    args = (bad, y) if which == "X" else (X, bad)
    _raises(ValueError, (which, str(shape)), fit_batch, s.fit_model, *args, init)


def test_fit_batch_rejects_nan_data(setup):
    s, X, y, init = setup
    y = y.clone()
    y[1, 4] = math.nan
    _raises(ValueError, ("y", "(1, 4)", "nan"), fit_batch, s.fit_model, X, y, init)


def test_fit_batch_rejects_nan_bounds(setup):
    s, X, y, init = setup
    _raises(ValueError, ("beta0", "nan"), fit_batch, s.fit_model, X, y, init, bounds={"beta0": (math.nan, 1.0)})


def test_fit_batch_tol_inf_no_longer_converges_at_start(setup):
    s, X, y, init = setup
    with pytest.raises(ValueError, match="tol must be a finite number > 0, got inf"):
        fit_batch(s.fit_model, X, y, init, tol=math.inf)


@pytest.mark.parametrize("method", ["lm", "adam", "sgd-paper"])
def test_fit_batch_valid_calls_still_work(setup, method):
    s, X, y, init = setup
    res = fit_batch(s.fit_model, X, y, init, method=method, max_iter=3, tol=1e-8, xtol=0.0, lr=None,
                    epochs=1, batch_size=16, seed=np.int64(3))
    assert res.risk.shape == (2,)
    assert bool(torch.isfinite(res.risk).all())


# ------------------------------------------------------------------ init_*
@pytest.mark.parametrize(("kwargs", "name", "err"), [
    (dict(perturbation=-0.1), "perturbation", ValueError),
    (dict(perturbation=math.nan), "perturbation", ValueError),
    (dict(perturbation=math.inf), "perturbation", ValueError),
    (dict(perturbation="0.1"), "perturbation", TypeError),
    (dict(seed=-1), "seed", ValueError),
    (dict(seed=2.5), "seed", ValueError),
    (dict(batch_shape=(2, 0)), "batch_shape", ValueError),
    (dict(batch_shape=True), "batch_shape", ValueError),
])
def test_init_near_truth_rejects(setup, kwargs, name, err):
    s = setup[0]
    kw = dict(batch_shape=(2,)) | kwargs
    value = kwargs[name]
    _raises(err, (name, repr(value)), init_near_truth, s.fit_model, s.true_model, s.truth, **kw)


@pytest.mark.parametrize(("kwargs", "name", "err"), [
    (dict(scale=-1.0), "scale", ValueError),
    (dict(scale=0), "scale", ValueError),
    (dict(scale=math.nan), "scale", ValueError),
    (dict(scale=None), "scale", TypeError),
    (dict(seed=-7), "seed", ValueError),
    (dict(seed="0"), "seed", ValueError),
])
def test_init_random_rejects(setup, kwargs, name, err):
    s = setup[0]
    _raises(err, (name, repr(kwargs[name])), init_random, s.fit_model, batch_shape=(2,), **kwargs)


@pytest.mark.parametrize(("kwargs", "name", "err"), [
    (dict(gate_scale=-0.1), "gate_scale", ValueError),
    (dict(expert_scale=math.nan), "expert_scale", ValueError),
    (dict(exponent=math.inf), "exponent", ValueError),
    (dict(n=0), "n", ValueError),
    (dict(seed=-2), "seed", ValueError),
])
def test_init_paper_rejects(setup, kwargs, name, err):
    s = setup[0]
    kw = dict(n=100) | kwargs
    n = kw.pop("n")
    _raises(err, (name, repr(kwargs[name])), init_paper, s.fit_model, s.true_model, s.truth, n, **kw)


def test_init_valid_calls_still_work(setup):
    s = setup[0]
    a = init_near_truth(s.fit_model, s.true_model, s.truth, batch_shape=3, perturbation=0, seed=np.int64(4))
    b = init_random(s.fit_model, batch_shape=(2, 2), scale=math.inf, seed=np.random.SeedSequence(5))
    c = init_paper(s.fit_model, s.true_model, s.truth, 50, batch_shape=(2,), seed=np.random.default_rng(0))
    assert s.fit_model.batch_shape(a) == (3,)
    assert s.fit_model.batch_shape(b) == (2, 2)
    assert s.fit_model.batch_shape(c) == (2,)


# ------------------------------------------------------------------ make_preset
@pytest.mark.parametrize(("name", "kwargs", "match", "err"), [
    ("no-such-preset", {}, ("preset", "'no-such-preset'"), ValueError),
    (None, {}, ("preset", "None"), ValueError),
    (PRESET, dict(seed=-1), ("seed", "-1"), ValueError),
    (PRESET, dict(seed=1.5), ("seed", "1.5"), TypeError),
    (PRESET, dict(input_dim=0), ("input_dim", "0"), ValueError),
    (PRESET, dict(n_true=-2), ("n_true", "-2"), ValueError),
    (PRESET, dict(n_fit=2.5), ("n_fit", "2.5"), TypeError),
    (PRESET, dict(n_true=4, n_fit=3), ("n_fit=3", "n_true=4"), ValueError),
    (PRESET, dict(noise_std=math.nan), ("noise_std", "nan"), ValueError),
    (PRESET, dict(widht=3), ("widht",), ValueError),
])
def test_make_preset_rejects(name, kwargs, match, err):
    _raises(err, match, make_preset, name, **kwargs)


def test_make_preset_valid_call_still_works():
    s = make_preset(PRESET, seed=np.int64(2), input_dim=3)
    assert s.true_model.input_dim == 3


# ------------------------------------------------------------------ losses
W, A = np.array([0.5, 0.5]), np.array([[0.0, 1.0], [1.0, 0.0]])


@pytest.mark.parametrize(("args", "match"), [
    ((np.array([0.5, math.nan]), A, W, A), ("weights", "NaN", "(1,)")),
    ((W, np.array([[0.0, math.inf], [1.0, 0.0]]), W, A), ("atoms", "inf")),
    ((W, A, W, np.array([[0.0, math.nan], [1.0, 0.0]])), ("true_atoms", "NaN", "(0, 1)")),
    ((W, A[:1], W, A), ("atoms", "(1, 2)")),
    ((W, A, W[:1], A), ("true_weights", "(1,)")),
    ((W, A, W, A[:, :1]), ("p=2", "p=1")),
    ((np.array([0.5, -0.5]), A, W, A), ("weights", "-0.5")),
])
def test_voronoi_loss_rejects(args, match):
    _raises(ValueError, match, voronoi_loss, *args)


@pytest.mark.parametrize(("kwargs", "match", "err"), [
    (dict(kind="D3"), ("kind", "'D3'"), ValueError),
    (dict(kind="D2", r=0.5), ("r", "0.5"), ValueError),
    (dict(kind="D2", r=math.nan), ("r", "nan"), ValueError),
])
def test_voronoi_loss_rejects_option(kwargs, match, err):
    _raises(err, match, voronoi_loss, W, A, W, A, **kwargs)


def test_l2_error_rejects_nan_truth(setup):
    s, _, _, init = setup
    truth = {k: v.clone() for k, v in s.truth.items()}
    truth["a"][0, 0] = math.nan
    _raises(ValueError, ("truth['a']", "nan"), l2_error, s.fit_model, init, truth, n_eval=100)


def test_l2_error_rejects_bad_eval_options(setup):
    s, _, _, init = setup
    _raises(ValueError, ("seed", "-1"), l2_error, s.fit_model, init, s.truth, n_eval=100, seed=-1)
    _raises(ValueError, ("n_eval", "0"), l2_error, s.fit_model, init, s.truth, n_eval=0)


def test_losses_valid_calls_still_work(setup):
    s, _, _, init = setup
    assert float(voronoi_loss(W, A, W, A)) == pytest.approx(0.0)
    err = l2_error(s.fit_model, init, s.truth, n_eval=100)
    assert err.shape == (2,) and bool(torch.isfinite(err).all())
