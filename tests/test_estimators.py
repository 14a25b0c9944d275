"""Tests of the batched estimators: loop vs batch, recovery, certificates, chunking, devices."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from roundoff import assert_tensors_match

from hmoe_sim import make_preset, sample_batch
from hmoe_sim.estimators import (
    Bounds,
    ConvergenceWarning,
    GaussianMLE,
    LeastSquaresMoE,
    fit_batch,
    fit_multistart,
    init_near_truth,
    init_random,
    split_atoms,
)
from hmoe_sim.estimators._core import Problem

PRESETS = ["softmax-linear", "sigmoid-regime2", "hmoe-nonshared", "hmoe-shared"]


def _data(name: str, B: int, n: int, *, seed: int = 0, noise: float | None = None, exact: bool = False,
          dtype: torch.dtype = torch.float64):
    s = make_preset(name, seed=seed)
    fit_model = s.true_model if exact else s.fit_model
    X, y = sample_batch(s.true_model, s.truth, n, s.noise_std if noise is None else noise,
                        [np.random.SeedSequence([seed, 7, b]) for b in range(B)], dtype=dtype)
    return s, fit_model, X, y


def _assert_same_params(a: dict, b: dict, **tol) -> None:
    for k in a:
        torch.testing.assert_close(a[k], b[k], **tol)


# ------------------------------------------------------------------ Jacobian
@pytest.mark.parametrize("name", PRESETS)
def test_jacobian_matches_forward_mode_autodiff(name):
    s, model, X, y = _data(name, 2, 30)
    theta = model.flatten(init_near_truth(model, s.true_model, s.truth, batch_shape=2, perturbation=0.3, seed=3))
    w = torch.ones_like(y)
    problem = Problem(model, X, y, w, w.sum(-1), *Bounds().vectors(model))
    r, J = problem.residual_and_jacobian(theta)
    for b in range(2):
        ref = torch.func.jacfwd(lambda t, b=b: model.predict(model.unflatten(t), X[b], check=False))(theta[b])
        torch.testing.assert_close(J[b], ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(r[b], y[b] - model.predict(model.unflatten(theta[b]), X[b]))


# ------------------------------------------------------------------ batch vs loop
@pytest.mark.parametrize("method", ["lm", "adam", "sgd-paper"])
def test_batched_fit_equals_fits_one_by_one_in_any_order(method):
    s, model, X, y = _data("softmax-linear", 3, 200)
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=3, perturbation=0.1, seed=1)
    seeds = [11, 12, 13]
    kw = dict(method=method, max_iter=60, truth=s.truth)
    full = fit_batch(model, X, y, init, seed=seeds, **kw)
    order = [2, 0, 1]
    perm = fit_batch(model, X[order], y[order], {k: v[order] for k, v in init.items()},
                     seed=[seeds[i] for i in order], **kw)
    for pos, b in enumerate(order):
        one = fit_batch(model, X[b : b + 1], y[b : b + 1], {k: v[b : b + 1] for k, v in init.items()},
                        seed=[seeds[b]], **kw)
        for res in (one, perm):
            i = 0 if res is one else pos
            _assert_same_params({k: v[i] for k, v in res.params.items()},
                                {k: v[b] for k, v in full.params.items()}, rtol=1e-9, atol=1e-11)
            assert res.n_iter[i] == full.n_iter[b]


def test_chunked_and_unchunked_runs_agree_to_round_off():
    # other stack shapes may round differently (tests/roundoff.py); the fits must be the same fits
    s, model, X, y = _data("hmoe-nonshared", 5, 150)
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=5, perturbation=0.1, seed=2)
    ref = fit_batch(model, X, y, init, max_iter=40)
    for size in (1, 2, 3):
        res = fit_batch(model, X, y, init, max_iter=40, chunk_size=size)
        for k in ref.params:
            assert_tensors_match(res.params[k], ref.params[k])
        assert torch.equal(ref.n_iter, res.n_iter)
        assert_tensors_match(res.risk, ref.risk)


@pytest.mark.parametrize("name", ["softmax-linear", "hmoe-shared"])
@pytest.mark.parametrize("method", ["lm", "adam"])
def test_fit_under_no_grad_and_inference_mode_is_the_same_fit(name, method):
    # the certificate differentiates the risk; a caller's no_grad / inference_mode must not break
    # it, also with data, starts and model all made inside inference mode
    def fit():
        s, model, X, y = _data(name, 2, 120)
        init = init_near_truth(model, s.true_model, s.truth, batch_shape=2, perturbation=0.1, seed=3)
        return fit_batch(model, X, y, init, method=method, max_iter=25, truth=s.truth)

    ref = fit()
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            res = fit()
        assert not res.risk.is_inference()
        for field in ("risk", "grad_norm", "n_iter", "converged", "risk_truth"):
            assert torch.equal(getattr(res, field), getattr(ref, field)), (mode.__name__, field)
        for k in ref.params:
            assert torch.equal(res.params[k], ref.params[k])


def test_mask_gives_the_fit_of_the_shorter_data_set():
    s, model, X, y = _data("softmax-linear", 2, 240)
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=2, perturbation=0.1, seed=4)
    mask = torch.ones(2, 240, dtype=torch.bool)
    mask[1, 150:] = False
    Xp, yp = X.clone(), y.clone()
    Xp[1, 150:] = float("nan")  # padding must not leak into the fit
    ragged = fit_batch(model, Xp, yp, init, mask=mask, max_iter=50)
    short = fit_batch(model, X[1:, :150], y[1:, :150], {k: v[1:] for k, v in init.items()}, max_iter=50)
    _assert_same_params({k: v[1:] for k, v in ragged.params.items()}, short.params, rtol=1e-9, atol=1e-11)
    assert ragged.n[1] == 150 and ragged.n[0] == 240
    assert not ragged.diverged.any()


# ------------------------------------------------------------------ recovery and certificates
@pytest.mark.parametrize("name", ["softmax-linear", "hmoe-nonshared", "hmoe-shared"])
def test_exact_specified_noise_free_recovers_mixing_measure(name):
    s, model, X, y = _data(name, 2, 400, noise=0.0, exact=True)
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=2, perturbation=0.05, seed=5)
    res = fit_batch(model, X, y, init, max_iter=300)
    assert res.converged.all() and not res.diverged.any()
    truth_mm = s.true_model.mixing_measure(s.truth)
    fit_mm = model.mixing_measure(res.params)
    for b in range(2):
        torch.testing.assert_close(fit_mm.weights[b], truth_mm.weights, rtol=0, atol=1e-6)
        torch.testing.assert_close(fit_mm.atoms[b], truth_mm.atoms, rtol=0, atol=1e-6)
    assert (res.risk < 1e-20).all()


@pytest.mark.parametrize("name", PRESETS)
def test_overspecified_fit_is_no_worse_than_the_truth(name):
    s, model, X, y = _data(name, 3, 500, seed=1)
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=3, perturbation=0.05, seed=6)
    res = fit_batch(model, X, y, init, truth=s.truth, max_iter=100)
    assert torch.isfinite(res.risk_truth).all()
    assert (res.risk <= res.risk_truth + 1e-10).all(), (res.risk, res.risk_truth)
    # the truth's risk is the independent RSS/n of the true model on the same data
    manual = (y - s.true_model.predict(s.truth, X)).square().mean(-1)
    torch.testing.assert_close(res.risk_truth, manual)


def test_gaussian_mle_noise_variance_within_5_percent_at_n_1e5():
    s, model, X, y = _data("softmax-linear", 1, 100_000, exact=True)
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=(), perturbation=0.05, seed=7)
    with warnings.catch_warnings():  # 30 steps leave this weakly identified truth short of ftol
        warnings.simplefilter("ignore", ConvergenceWarning)
        est = GaussianMLE(model, max_iter=30).fit(X[0], y[0], init=init)
    nu = s.noise_std**2
    assert abs(est.noise_var_ - nu) / nu < 0.05
    n = 100_000
    rss = (y[0] - est.predict(X[0])).square().sum().item()
    assert est.noise_var_ == pytest.approx(rss / n, rel=1e-10)
    assert est.loglik_ == pytest.approx(-n / 2 * (math.log(2 * math.pi * rss / n) + 1), rel=1e-10)


@pytest.mark.parametrize("method", ["lm", "adam", "sgd-paper"])
def test_divergent_data_set_is_flagged_and_others_finish(method):
    s, model, X, y = _data("softmax-linear", 3, 200)
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=3, perturbation=0.1, seed=8)
    # finite data whose squared residual overflows: the objective of data set 1 is inf
    # (NaN or inf in the data themselves is refused up front: test_reliability.py)
    bad = y.clone()
    bad[1, 5] = 1e200
    res = fit_batch(model, X, bad, init, method=method, max_iter=40, seed=[1, 2, 3])
    clean = fit_batch(model, X, y, init, method=method, max_iter=40, seed=[1, 2, 3])
    assert res.diverged.tolist() == [False, True, False]
    assert not bool(res.converged[1])
    for b in (0, 2):
        _assert_same_params({k: v[b] for k, v in res.params.items()},
                            {k: v[b] for k, v in clean.params.items()}, rtol=1e-9, atol=1e-11)
    assert res.certificate_frame()["diverged"].tolist() == [False, True, False]


@pytest.mark.parametrize("name", PRESETS)
def test_float32_fit_agrees_with_float64(name):
    # exact-specified: a well-determined minimum that both precisions must reach
    s, model, X, y = _data(name, 2, 300, exact=True)
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=2, perturbation=0.05, seed=9)
    r64 = fit_batch(model, X, y, init, max_iter=100, truth=s.truth)
    r32 = fit_batch(model, X, y, init, max_iter=100, dtype="float32", truth=s.truth)
    assert r32.params["beta0"].dtype == torch.float32
    assert not r32.diverged.any()
    torch.testing.assert_close(r32.risk_truth.double(), r64.risk_truth, rtol=1e-5, atol=0)
    # the float32 certificate is right (risk recomputed in float64 at the float32 fit) ...
    p64 = model.cast(r32.params, dtype=torch.float64)
    torch.testing.assert_close(r32.risk.double(), (y - model.predict(p64, X)).square().mean(-1), rtol=1e-4, atol=0)
    # ... and both precisions end at least as low as the truth (the precisions stop at
    # different points of these weakly identified minima: ftol is floored at 4 eps)
    assert (r32.risk.double() <= r64.risk_truth * (1 + 1e-4)).all()
    assert (r64.risk <= r64.risk_truth).all()


# ------------------------------------------------------------------ bounds
def test_bounds_are_enforced_and_boundary_is_flagged():
    s, model, X, y = _data("softmax-linear", 2, 200)
    box = Bounds({"a": (-0.05, 0.05)})
    # starts must lie in the box (fit_batch refuses others): init_near_truth clips into it
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=2, perturbation=0.1, seed=10, bounds=box)
    res = fit_batch(model, X, y, init, bounds=box, max_iter=30)
    assert (res.params["a"].abs() <= 0.05).all()
    assert res.on_boundary.all()  # true |a| entries exceed 0.05, so the fit presses on the box
    assert box.on_boundary(model, res.params).all()
    wide = fit_batch(model, X, y, init, bounds=Bounds.unbounded(), max_iter=3)
    assert not wide.on_boundary.any()


def test_boundary_params_name_the_bound_that_was_hit():
    s, model, X, y = _data("softmax-linear", 3, 200)
    # a's upper side binds on every fit; beta0's lower side on none (its box is wide)
    box = Bounds({"a": (-10.0, 0.05), "beta1": (-0.5, 0.5)})
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=3, perturbation=0.1, seed=10, bounds=box)
    res = fit_batch(model, X, y, init, bounds=box, max_iter=30)
    theta = model.flatten(res.params)
    lo, hi = box.vectors(model)
    for b in range(3):
        # independent reading: a label per name and side with some entry within tolerance of the bound
        expected = []
        for name in model.param_shapes():
            v = res.params[name][b]
            low, high = box.limits_for(name)
            if (v <= low + 1e-6 * (1 + abs(low))).any():
                expected.append(f"{name}:lo")
            if (v >= high - 1e-6 * (1 + abs(high))).any():
                expected.append(f"{name}:hi")
        assert res.boundary_params[b] == sorted(expected)
        assert "a:hi" in res.boundary_params[b]
        assert bool(res.on_boundary[b]) == bool(res.boundary_params[b])
    frame = res.certificate_frame()
    assert frame["boundary_params"].tolist() == [",".join(x) for x in res.boundary_params]
    assert box.boundary_params(model, theta, lo, hi) == res.boundary_params
    # a point inside the box has no labels; one coordinate on each side gives both
    inside = torch.zeros(1, model.n_params, dtype=torch.float64)
    assert box.boundary_params(model, inside, lo, hi) == [[]]
    inside[0, 0], inside[0, -1] = -10.0, 10.0  # beta0[0] at lo, b[-1] at hi
    assert box.boundary_params(model, inside, lo, hi) == [["b:hi", "beta0:lo"]]
    # open sides are never reached
    free = Bounds.unbounded()
    assert free.boundary_params(model, torch.full((1, model.n_params), 1e300, dtype=torch.float64),
                                *free.vectors(model)) == [[]]


def test_boundary_params_survive_chunks_and_multistart():
    s, model, X, y = _data("softmax-linear", 2, 150)
    box = Bounds({"a": (-0.05, 0.05)})
    init = init_random(model, batch_shape=(2, 3), seed=5, scale=0.5, bounds=box)
    best = fit_multistart(model, X, y, n_starts=3, init=init, max_iter=20, bounds=box, chunk_size=2)
    for b in range(2):
        j = int(best.start[b])
        one = fit_batch(model, X[b : b + 1], y[b : b + 1], {k: v[b, j : j + 1] for k, v in init.items()},
                        max_iter=20, bounds=box)
        assert best.boundary_params[b] == one.boundary_params[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = {k: v[0, 0] for k, v in init.items()}
        est = LeastSquaresMoE(model, bounds=box, max_iter=20).fit(X[0], y[0], init=start)
    assert isinstance(est.boundary_params_, list) and {"a:lo", "a:hi"} & set(est.boundary_params_)
    assert est.certificate_frame()["boundary_params"].tolist() == [",".join(est.boundary_params_)]


def test_bounds_reject_bad_input():
    with pytest.raises(ValueError, match="low < high"):
        Bounds({"beta0": (1.0, -1.0)})
    with pytest.raises(ValueError, match="pair"):
        Bounds({"beta0": 3.0})
    model = make_preset("softmax-linear").fit_model
    with pytest.raises(ValueError, match="unknown parameter"):
        Bounds({"W1": (-1, 1)}).vectors(model)


# ------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("name", PRESETS)
def test_split_start_has_the_true_regression_function(name):
    s = make_preset(name, seed=2)
    X = torch.rand(50, s.true_model.input_dim, dtype=torch.float64) * 2 - 1
    start = split_atoms(s.fit_model, s.true_model, s.truth)
    torch.testing.assert_close(s.fit_model.predict(start, X), s.true_model.predict(s.truth, X))
    w_true = s.true_model.mixing_measure(s.truth).weights.sum()
    if getattr(s.fit_model, "gate", "softmax") == "softmax":
        torch.testing.assert_close(s.fit_model.mixing_measure(start).weights.sum(), w_true)


def test_init_protocols_are_seeded_and_bounded():
    s = make_preset("hmoe-shared")
    a = init_near_truth(s.fit_model, s.true_model, s.truth, batch_shape=(2, 3), perturbation=0.1, seed=3)
    b = init_near_truth(s.fit_model, s.true_model, s.truth, batch_shape=(2, 3), perturbation=0.1, seed=3)
    assert s.fit_model.batch_shape(a) == torch.Size([2, 3])
    _assert_same_params(a, b, rtol=0, atol=0)
    r = init_random(s.fit_model, batch_shape=4, bounds=Bounds({"z": (0.0, 0.5)}), seed=np.random.SeedSequence(1))
    assert ((r["z"] >= 0) & (r["z"] <= 0.5)).all() and (r["W1"].abs() <= 1).all()
    with pytest.raises(ValueError, match="perturbation"):
        init_near_truth(s.fit_model, s.true_model, s.truth, batch_shape=2, perturbation=-1.0)
    with pytest.raises(ValueError, match="fewer"):
        split_atoms(s.true_model, s.fit_model, make_preset("hmoe-shared").fit_model.sample_truth(0))


def test_multistart_keeps_the_best_start_per_data_set():
    s, model, X, y = _data("softmax-linear", 2, 200)
    init = init_random(model, batch_shape=(2, 3), seed=5, scale=0.5)
    best = fit_multistart(model, X, y, n_starts=3, init=init, max_iter=40)
    for b in range(2):
        singles = [fit_batch(model, X[b : b + 1], y[b : b + 1], {k: v[b, j : j + 1] for k, v in init.items()},
                             max_iter=40).risk.item() for j in range(3)]
        assert best.start[b].item() == int(np.argmin(singles))
        assert best.risk[b].item() == pytest.approx(min(singles), rel=1e-9)


# ------------------------------------------------------------------ estimator interface
def test_estimator_interface_and_convergence_warning():
    s, model, X, y = _data("hmoe-nonshared", 1, 200)
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=(), perturbation=0.1, seed=1)
    est = LeastSquaresMoE(model, max_iter=1)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        assert est.fit(X[0], y[0], init=init) is est
    assert isinstance(est.converged_, bool) and est.n_iter_ == 1
    assert model.batch_shape(est.params_) == torch.Size([])
    assert est.predict(X[0]).shape == (200,)
    with warnings.catch_warnings():  # 30 iterations are too few to converge here; the shapes are what is tested
        warnings.simplefilter("ignore", ConvergenceWarning)
        batch = GaussianMLE(model, n_starts=2, max_iter=30, random_state=4).fit(X.expand(3, -1, -1), y.expand(3, -1))
    assert batch.noise_var_.shape == (3,) and batch.loglik_.shape == (3,)
    frame = batch.certificate_frame()
    assert list(frame["fit"]) == [0, 1, 2] and {"risk", "grad_norm", "on_boundary", "start"} <= set(frame)


def test_fit_batch_rejects_bad_input():
    s, model, X, y = _data("softmax-linear", 2, 20)
    init = init_random(model, batch_shape=2)
    with pytest.raises(ValueError, match="method"):
        fit_batch(model, X, y, init, method="newton")
    with pytest.raises(ValueError, match="y has shape"):
        fit_batch(model, X, y[:, :5], init)
    with pytest.raises(ValueError, match="batch shape"):
        fit_batch(model, X, y, init_random(model, batch_shape=3))
    with pytest.raises(ValueError, match="empty"):
        fit_batch(model, X, y, init, mask=torch.zeros(2, 20, dtype=torch.bool))


# ------------------------------------------------------------------ devices
def test_fit_on_each_device(device):
    s, model, X, y = _data("hmoe-shared", 2, 200)
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=2, perturbation=0.05, seed=2)
    cpu = fit_batch(model, X, y, init, max_iter=20)
    res = fit_batch(model, X, y, init, max_iter=20, device=device)
    assert res.risk.device.type == device
    torch.testing.assert_close(res.risk.cpu(), cpu.risk, rtol=1e-8, atol=0)
    r32 = fit_batch(model, X, y, init, max_iter=20, device=device, dtype=torch.float32)
    assert not r32.diverged.any()
