"""Tests of hmoe_sim.sample_complexity: the two-point constant, n* in closed form, the flat family, exponents."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from hmoe_sim.models import FlatMoE, make_preset
from hmoe_sim.sample_complexity import (
    MASS_CONSERVING,
    exponent_table,
    local_exponents,
    power_law_exponent,
    sample_complexity_curve,
    sample_complexity_table,
    separation_sample_size,
    two_point_z,
)

EPS = np.logspace(-1, -6, 11)


def test_two_point_z_matches_scipy_quantiles() -> None:
    assert two_point_z(0.05, 0.95) == pytest.approx((2 * norm.ppf(0.95)) ** 2, rel=1e-12)
    assert two_point_z(0.01, 0.8) == pytest.approx((norm.ppf(0.99) + norm.ppf(0.8)) ** 2, rel=1e-12)


def test_n_star_gives_the_stated_level_and_power_by_simulation() -> None:
    # constant difference Delta = d: at n = n*, the Neyman-Pearson test has level 0.05 and power 0.95
    sigma, d, z = 0.1, 0.01, two_point_z(0.05, 0.95)
    n = int(round(separation_sample_size(d, sigma, z).item()))
    rng = np.random.default_rng(0)
    reps = 4000
    crit = norm.ppf(0.95) * sigma * d * math.sqrt(n)
    t_null = (sigma * rng.standard_normal((reps, n))).sum(1) * d
    t_alt = (d + sigma * rng.standard_normal((reps, n))).sum(1) * d
    assert abs((t_null > crit).mean() - 0.05) < 0.012
    assert abs((t_alt > crit).mean() - 0.95) < 0.012


def test_separation_sample_size_is_infinite_at_zero_and_rejects_bad_input() -> None:
    out = separation_sample_size(np.array([0.0, 0.5]), 0.1, 4.0)
    assert out[0] == math.inf and out[1] == pytest.approx(0.01 * 4 / 0.25)
    with pytest.raises(ValueError, match="-1"):
        separation_sample_size(np.array([-1.0]), 0.1, 4.0)
    with pytest.raises(ValueError, match="noise_std"):
        separation_sample_size(0.1, 0.0, 4.0)
    with pytest.raises(ValueError, match="level"):
        two_point_z(1.5, 0.9)


def _constant_model(expert: str, w: float, m: float, c: float) -> tuple[FlatMoE, dict[str, torch.Tensor]]:
    """One atom with constant gate and expert (beta1 = a = 0) beside one anchor with expert phi(c)."""
    d = 2
    anchors = {"beta0": np.zeros(1), "beta1": np.zeros((1, d)), "a": np.zeros((1, d)), "b": np.array([c])}
    model = FlatMoE(d, 1, expert=expert, anchors=anchors)
    truth = {"beta0": torch.tensor([math.log(w)], dtype=torch.float64), "beta1": torch.zeros(1, d, dtype=torch.float64),
             "a": torch.zeros(1, d, dtype=torch.float64), "b": torch.tensor([m], dtype=torch.float64)}
    return model, truth


@pytest.mark.parametrize("expert", ["identity", "tanh"])
def test_n_star_matches_the_closed_form_of_a_constant_model(expert: str) -> None:
    # f is constant in x, so ||f_eps - f*||_L2 is the constant difference itself:
    # f_eps = (phi(c) + W/2 (phi(m + eps) + phi(m - eps))) / (1 + W), W = w + eps^(r+1)
    w, m, c, sigma = 0.7, 0.4, -0.3, 0.1
    phi = {"identity": lambda t: t, "tanh": math.tanh}[expert]
    model, truth = _constant_model(expert, w, m, c)
    eps = np.logspace(-1, -3, 5)
    table = sample_complexity_curve(model, truth, label="tiny", noise_std=sigma, eps=eps, r_values=(1, 2),
                                    n_eval=50, window=3)
    z = two_point_z()
    f_star = (phi(c) + w * phi(m)) / (1 + w)
    for row in table.itertuples():
        e, r = row.eps, row.r
        mass = 0.0 if r == math.inf else e ** (r + 1)
        big = w + mass
        if expert == "identity":  # the bias terms cancel exactly: only the mass moves f
            diff = (m - c) * mass / ((1 + w) * (1 + big))
        else:
            diff = (phi(c) + big / 2 * (phi(m + e) + phi(m - e))) / (1 + big) - f_star
        assert row.l2 == pytest.approx(abs(diff), rel=1e-7, abs=1e-300)
        assert row.D1 == pytest.approx(big * e**2 + mass, rel=1e-12)
        if r != math.inf:
            assert row.D2 == pytest.approx(big * e**r + mass, rel=1e-12)
        expected = math.inf if diff == 0 else sigma**2 * z / diff**2
        assert row.n_star == pytest.approx(expected, rel=1e-6)


def test_linear_closed_form_holds_at_tiny_eps() -> None:
    # identity experts: the difference is a product, free of cancellation, so check it down to eps = 1e-7
    w, m, c = 0.7, 0.4, -0.3
    model, truth = _constant_model("identity", w, m, c)
    table = sample_complexity_curve(model, truth, label="tiny", noise_std=0.1, eps=[1e-7], r_values=(2,),
                                    mass_conserving=False, n_eval=10, window=2)
    mass = 1e-21
    assert table.l2.iloc[0] == pytest.approx((m - c) * mass / ((1 + w) * (1 + w + mass)), rel=1e-9)


@pytest.mark.parametrize("preset", ["softmax-linear", "hmoe-nonshared"])
def test_exact_flat_family_has_infinite_n_star(preset: str) -> None:
    setup = make_preset(preset)
    table = sample_complexity_curve(setup.true_model, setup.truth, label=preset, noise_std=0.1, eps=EPS,
                                    r_values=(), n_eval=2000)
    assert (table.sequence == MASS_CONSERVING).all()
    assert (table.l2 == 0).all() and np.isinf(table.n_star).all()
    assert (table.l2_naive < 1e-14).all()  # the two predictions agree up to round-off only
    # D1 of the mass-conserving split: both atoms keep w*/2 and move the bias by eps -> sum over splits w* eps^2
    w = torch.exp(setup.truth["beta0"][..., 0]).sum().item()
    np.testing.assert_allclose(table.D1, w * table.eps**2, rtol=1e-12)
    assert table.local_exponent_D1.isna().all()
    exps = exponent_table(table)
    assert not exps.n_star_finite.any() and exps.exponent_all.isna().all()


def test_mass_conserving_split_is_finite_for_tanh_and_shared() -> None:
    table = sample_complexity_table(models=["flat softmax, tanh experts", "HMoE shared (tanh)"], eps=EPS,
                                    r_values=(), n_eval=2000)
    assert np.isfinite(table.n_star).all() and (table.l2 > 0).all()


def test_free_linear_atoms_follow_the_order_count() -> None:
    # bias split of a linear expert: f_eps - f* comes only from the mass eps^(r+1), so n* ~ eps^-2(r+1)
    # and D1 ~ eps^2 (location) gives n* ~ D1^-(r+1)
    table = sample_complexity_table(models=["flat softmax, linear experts"], eps=EPS, r_values=(1, 2, 3),
                                    n_eval=2000)
    exps = exponent_table(table).set_index(["sequence", "against"])
    for r in (1, 2, 3):
        assert exps.loc[(f"r={r}", "eps"), "exponent_small_eps"] == pytest.approx(2 * (r + 1), abs=1e-3)
        assert exps.loc[(f"r={r}", "D1"), "exponent_small_eps"] == pytest.approx(r + 1, abs=1e-3)
        assert exps.loc[(f"r={r}", "D2"), "exponent_small_eps"] == pytest.approx(2 * (r + 1) / r, abs=1e-3)


def test_exponents_of_a_synthetic_power_law() -> None:
    x = np.logspace(-1, -7, 25)
    y = 3.0 * x**-2.5
    assert power_law_exponent(x, y) == pytest.approx(2.5, abs=1e-10)
    np.testing.assert_allclose(local_exponents(x, y, window=5), 2.5, atol=1e-10)
    # a kink: exponent 2 above x = 1e-4, 3 below (continuous); consecutive slopes see it exactly
    kinked = np.where(x >= 1e-4, x**-2.0, 1e8 * (x / 1e-4) ** -3.0)
    local = local_exponents(x, kinked, window=2)
    np.testing.assert_allclose(local[:12], 2.0, atol=1e-10)
    np.testing.assert_allclose(local[13:], 3.0, atol=1e-10)
    with pytest.raises(ValueError, match="window"):
        local_exponents(x[:3], y[:3], window=5)
    with pytest.raises(ValueError, match="positive"):
        power_law_exponent(x, np.where(x > 1e-3, y, np.inf))
