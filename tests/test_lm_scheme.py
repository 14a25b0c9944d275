"""The LM's step schemes and its statistical stopping rule, on hand cases with known answers.

* a Rosenbrock least-squares problem (residuals ``10 (t1^2 - t2)`` and ``t1 - 1``, minimum 0 at (1, 1);
  with ``t1 <= 0.5`` the minimum over the box is at (0.5, 0.25)) for every scheme;
* the geodesic acceleration against its definition with an exact second directional derivative
  (forward-over-forward autodiff) and an explicit Jacobian;
* the resolution test on constructed quadratic models where it must fire and where it must not, and
  end to end: a fit stopped by it is within the stated fraction of the near-optimal margin of the
  fit the strict tests reach.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmoe_sim import make_preset, sample_batch
from hmoe_sim.estimators import _lm_scheme, fit_batch, init_near_truth
from hmoe_sim.estimators._core import STOP_REASONS, Problem, autograd_value_and_jacobian
from hmoe_sim.estimators._lm import solve_lm
from hmoe_sim.estimators._lm_scheme import LMScheme, geodesic_acceleration, resolution_test

SCHEMES = [LMScheme(update, geodesic, resolution=resolution) for update in ("delayed", "nielsen")
           for geodesic in (True, False) for resolution in (0.0, 1e-3)]


def _name(scheme: LMScheme) -> str:
    return f"{scheme.damping_update}-geodesic{scheme.geodesic}-resolution{scheme.resolution}"


class _Rosenbrock:
    """``f(t; x) = x_0 * 10 (t1^2 - t2) + x_1 * t1`` for ``x`` a one-hot sample; with ``y = (0, 1)`` the
    residuals are Rosenbrock's (up to sign)."""

    n_params = 2

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"t": theta}

    def predict(self, params: dict[str, torch.Tensor], X: torch.Tensor, check: bool = False) -> torch.Tensor:
        t = params["t"]
        t1, t2 = t[..., :1], t[..., 1:2]
        return X[..., 0] * 10 * (t1**2 - t2) + X[..., 1] * t1


def _rosenbrock_problem(B: int, hi: float = 10.0) -> Problem:
    X = torch.eye(2, dtype=torch.float64).expand(B, 2, 2).clone()
    y = torch.tensor([0.0, 1.0], dtype=torch.float64).expand(B, 2).clone()
    w = torch.ones_like(y)
    lo_v = torch.full((2,), -10.0, dtype=torch.float64)
    hi_v = torch.tensor([hi, 10.0], dtype=torch.float64)
    return Problem(_Rosenbrock(), X, y, w, w.sum(-1), lo_v, hi_v)  # type: ignore[arg-type]


STARTS = torch.tensor([[-1.2, 1.0], [0.0, 0.0], [2.0, -1.0], [-3.0, 5.0]], dtype=torch.float64)


@pytest.mark.parametrize("scheme", SCHEMES, ids=_name)
def test_every_scheme_finds_the_rosenbrock_minimum(scheme):
    problem = _rosenbrock_problem(len(STARTS))
    out = solve_lm(problem, STARTS.clone(), max_iter=500, ftol=1e-15, xtol=1e-15, gtol=1e-15, scheme=scheme)
    assert out.converged.all(), [STOP_REASONS[i] for i in out.stop.tolist()]
    torch.testing.assert_close(out.theta, torch.ones_like(out.theta), rtol=0, atol=1e-7)
    # a zero-residual minimum: the statistical test (margin proportional to the cost) never stops it early
    assert all(STOP_REASONS[i] != "resolution" or bool((out.theta - 1).abs().max() < 1e-7) for i in out.stop.tolist())


@pytest.mark.parametrize("scheme", SCHEMES, ids=_name)
def test_every_scheme_respects_the_box_and_finds_the_constrained_minimum(scheme):
    # with t1 <= 0.5 the minimum over the box is at t1 = 0.5 (the residual t1 - 1 pulls outward), t2 = 0.25
    problem = _rosenbrock_problem(len(STARTS), hi=0.5)
    starts = STARTS.clamp(max=0.5)
    out = solve_lm(problem, starts, max_iter=500, ftol=1e-15, xtol=1e-15, gtol=1e-15, scheme=scheme)
    assert out.converged.all()
    assert bool((out.theta[:, 0] <= 0.5).all())
    if scheme.resolution == 0:  # the strict tests: the minimiser itself
        torch.testing.assert_close(out.theta, torch.tensor([[0.5, 0.25]], dtype=torch.float64).expand_as(out.theta),
                                   rtol=0, atol=1e-7)
    # the cost within the stated bound (4/3 + 1) * fraction * cost / n of the minimum 0.125 (n = 2 samples)
    cost = 0.5 * problem.residual(out.theta).square().sum(-1)
    assert bool((cost - 0.125 <= (4 / 3 + 1) * scheme.resolution * 0.125 / 2 + 1e-14).all()), cost - 0.125


def test_geodesic_acceleration_matches_its_definition_with_exact_derivatives():
    s = make_preset("softmax-linear", seed=3)
    model = s.fit_model
    X, y = sample_batch(s.true_model, s.truth, 50, s.noise_std, [np.random.SeedSequence([4, b]) for b in range(3)])
    w = torch.ones_like(y)
    w[1, 40:] = 0.0  # a masked data set
    lo, hi = (torch.full((model.n_params,), v, dtype=torch.float64) for v in (-10.0, 10.0))
    problem = Problem(model, X * w.unsqueeze(-1), y * w, w, w.sum(-1), lo, hi)
    theta = model.flatten(init_near_truth(model, s.true_model, s.truth, batch_shape=3, perturbation=0.3, seed=1))
    v = 0.05 * torch.randn(theta.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    free = torch.ones_like(theta, dtype=torch.bool)
    free[2, 0] = False  # a frozen coordinate
    _, J = autograd_value_and_jacobian(model, theta, problem.X)
    J = J * w.unsqueeze(-1)
    lam = 1e-2
    M = J.mT @ J + lam * torch.eye(model.n_params, dtype=torch.float64)
    ff = free.unsqueeze(-1) & free.unsqueeze(-2)
    M = torch.where(ff, M, 0.0) + torch.diag_embed(torch.where(free, 0.0, 1.0))
    chol = torch.linalg.cholesky(M)

    def f_of(t: torch.Tensor) -> torch.Tensor:
        return problem.predict(t)

    # exact second directional derivative: d/ds d/ds f(theta + s v) at s = 0, forward over forward
    _, fvv = torch.func.jvp(lambda t: torch.func.jvp(f_of, (t,), (v,))[1], (theta,), (v,))
    rhs = torch.where(free, (J.mT @ (w * fvv).unsqueeze(-1)).squeeze(-1), 0.0)
    expected = -torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    # the central difference of the solver converges to it as h^2
    errors = []
    for h in (0.1, 0.01):
        got = geodesic_acceleration(problem, theta, v, chol, free, h)
        errors.append(float((got - expected).norm() / expected.norm()))
        assert float(got[2, 0]) == 0.0
    assert errors[1] < 1e-5
    assert errors[1] < errors[0] / 50  # second order
    # a zero step has a zero acceleration
    zero = geodesic_acceleration(problem, theta, torch.zeros_like(v), chol, free, 0.1)
    assert bool((zero == 0).all())


def _quadratic_case(diagonal: list[float], g: list[float], cost: float = 1.0, n: float = 100.0):
    A = torch.diag(torch.tensor(diagonal, dtype=torch.float64)).unsqueeze(0)
    gv = torch.tensor([g], dtype=torch.float64)
    theta = torch.zeros_like(gv)
    lo, hi = torch.full((len(g),), -1.0, dtype=torch.float64), torch.full((len(g),), 1.0, dtype=torch.float64)
    return A, gv, theta, torch.tensor([cost], dtype=torch.float64), torch.tensor([n], dtype=torch.float64), lo, hi


FRACTION = 1e-3
MARGIN = FRACTION * 1.0 / 100.0  # fraction * cost / n of _quadratic_case


def test_resolution_test_fires_at_the_minimum_and_below_the_margin():
    # at a minimum (g = 0): fires
    assert bool(resolution_test(*_quadratic_case([1.0, 2.0], [0.0, 0.0]), FRACTION)[0])
    # ||g|| = margin / 2 and the model's decrease g^2 / (2 s) = 0.4 margin: fires
    g = 0.5 * MARGIN
    s = g**2 / (0.8 * MARGIN)
    assert bool(resolution_test(*_quadratic_case([s, 5.0], [g, 0.0]), FRACTION)[0])
    # the same gradient with half that curvature: 0.8 margin, still fires; a tenth: 4 margins, does not
    assert bool(resolution_test(*_quadratic_case([s / 2, 5.0], [g, 0.0]), FRACTION)[0])
    assert not bool(resolution_test(*_quadratic_case([s / 10, 5.0], [g, 0.0]), FRACTION)[0])


def test_resolution_test_does_not_fire_where_a_visible_decrease_is_left():
    # gradient within the margin but a flat direction (curvature above mu = sqrt(eps)): the model's
    # decrease g^2 / (2 s) is 5 margins
    s = 1e-7
    g = (10 * MARGIN * s) ** 0.5
    assert g < MARGIN
    assert not bool(resolution_test(*_quadratic_case([s, 1.0], [g, 0.0]), FRACTION)[0])
    # a direction of zero curvature with a gradient: the damped model sees g^2 / mu, far above the margin
    assert not bool(resolution_test(*_quadratic_case([0.0, 1.0], [0.5 * MARGIN, 0.0]), FRACTION)[0])
    # a gradient above the margin
    assert not bool(resolution_test(*_quadratic_case([1.0, 1.0], [2 * MARGIN, 0.0]), FRACTION)[0])
    # non-finite numbers never pass
    assert not bool(resolution_test(*_quadratic_case([1.0, 1.0], [float("nan"), 0.0]), FRACTION)[0])
    assert not bool(resolution_test(*_quadratic_case([1.0, 1.0], [0.0, 0.0], cost=float("inf")), FRACTION)[0])


def test_resolution_test_ignores_a_gradient_that_pushes_out_of_the_box():
    A, g, theta, cost, n, lo, hi = _quadratic_case([1.0, 1.0], [5.0, 0.0])
    assert not bool(resolution_test(A, g, theta, cost, n, lo, hi, FRACTION)[0])
    theta[0, 0] = 1.0  # at the upper bound, descent (+g) points outward: that coordinate is frozen
    assert bool(resolution_test(A, g, theta, cost, n, lo, hi, FRACTION)[0])
    theta[0, 0] = -1.0  # at the lower bound the same gradient points inward: it counts
    assert not bool(resolution_test(A, g, theta, cost, n, lo, hi, FRACTION)[0])


def test_resolution_test_batched_equals_one_by_one():
    cases = [_quadratic_case([1.0, 2.0], [0.0, 0.0]), _quadratic_case([1e-7, 1.0], [1e-6, 0.0]),
             _quadratic_case([1.0, 1.0], [1.0, 0.0]), _quadratic_case([1e-2, 5.0], [1e-4, 0.0])]
    stacked = [torch.cat([c[i] for c in cases]) for i in (0, 1, 2, 3, 4)]
    together = resolution_test(*stacked, cases[0][5], cases[0][6], FRACTION)
    alone = torch.cat([resolution_test(*c, FRACTION) for c in cases])
    # margin 1e-5: the second has ||g|| = 1e-6 and decrease 5e-6 (fires), the last ||g|| = 1e-4 (does not)
    assert together.tolist() == alone.tolist() == [True, True, False, False]


def test_a_fit_stopped_at_the_resolution_is_within_the_margin_of_the_strict_fit():
    # an exactly specified fit: a regular minimum; at n = 60 the resolution test (a model decrease
    # below 1e-3 / n of the cost) stops data set 4 before ftol (1e-10) does, the others stop by ftol
    s = make_preset("softmax-linear", seed=1)
    model = s.true_model
    B, n = 6, 60
    X, y = sample_batch(s.true_model, s.truth, n, s.noise_std, [np.random.SeedSequence([5, b]) for b in range(B)])
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=B, perturbation=0.3, seed=2)
    stat = fit_batch(model, X, y, init, max_iter=3000, workers=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_lm_scheme, "DEFAULT_SCHEME", LMScheme(resolution=0.0))
        strict = fit_batch(model, X, y, init, max_iter=3000, workers=1)
    assert bool(stat.converged.all()) and bool(strict.converged.all())
    reasons = stat.stop_reasons
    assert "resolution" in reasons  # the case exercises the rule
    assert "resolution" not in strict.stop_reasons
    margin = strict.risk / n  # (2 * 0.5 / n) * risk
    # the strict fit goes on from where the statistical one stopped (same data, same start, same steps)
    # and lowers the risk by at most the rule's bound, (4/3 + 1) of the fraction of the margin
    moved = (stat.risk - strict.risk) / margin
    assert bool((moved >= -1e-9).all()), moved
    assert float(moved.max()) <= (4 / 3 + 1) * _lm_scheme.RESOLUTION_FRACTION, moved
    assert bool((stat.n_iter <= strict.n_iter).all())
    frame = stat.certificate_frame()
    assert frame["stop_reason"].tolist() == reasons
    assert set(frame.loc[frame["converged"], "stop_reason"]) <= {"gtol", "ftol", "xtol", "zero_risk", "resolution"}


def test_the_cap_is_not_converged_and_is_named():
    s = make_preset("hmoe-shared", seed=2)
    model = s.fit_model
    X, y = sample_batch(s.true_model, s.truth, 200, s.noise_std, [np.random.SeedSequence([6, b]) for b in range(2)])
    init = init_near_truth(model, s.true_model, s.truth, batch_shape=2, perturbation=0.5, seed=3)
    res = fit_batch(model, X, y, init, max_iter=3, workers=1)
    assert res.stop_reasons == ["max_iter", "max_iter"]
    assert not bool(res.converged.any())
    assert bool(torch.isfinite(res.risk).all()) and all(bool(torch.isfinite(v).all()) for v in res.params.values())


def test_lm_scheme_rejects_bad_values():
    with pytest.raises(ValueError, match="damping_update"):
        LMScheme("marquardt")
    with pytest.raises(ValueError, match="fd_step"):
        LMScheme(fd_step=0.0)
    with pytest.raises(ValueError, match="resolution"):
        LMScheme(resolution=float("nan"))
