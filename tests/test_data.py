"""Data generator: reproducibility, distributions, noise level, seeds, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hmoe_sim.data import cell_seed, sample, sample_batch
from hmoe_sim.models import make_preset


@pytest.fixture(scope="module")
def setup():
    return make_preset("hmoe-shared", seed=1)


def test_same_seed_same_data_bit_for_bit(setup) -> None:
    X1, y1 = sample(setup.true_model, setup.truth, 500, 0.1, 42)
    X2, y2 = sample(setup.true_model, setup.truth, 500, 0.1, 42)
    assert torch.equal(X1, X2) and torch.equal(y1, y2)
    X3, y3 = sample(setup.true_model, setup.truth, 500, 0.1, 43)
    assert not torch.equal(X1, X3) and not torch.equal(y1, y3)


def test_seed_sequence_and_generator_accepted(setup) -> None:
    ss = cell_seed(7, "shared", 1000, 0)
    a = sample(setup.true_model, setup.truth, 50, 0.1, ss)
    b = sample(setup.true_model, setup.truth, 50, 0.1, np.random.default_rng(cell_seed(7, "shared", 1000, 0)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_uniform_and_gaussian_inputs(setup) -> None:
    X, _ = sample(setup.true_model, setup.truth, 20000, 0.1, 0)
    assert X.shape == (20000, setup.true_model.input_dim)
    assert float(X.min()) >= -1 and float(X.max()) <= 1
    np.testing.assert_allclose(X.var(0).numpy(), 1 / 3, atol=0.02)  # Var U(-1, 1) = 1/3
    Xg, _ = sample(setup.true_model, setup.truth, 20000, 0.1, 0, x_dist="gaussian")
    np.testing.assert_allclose(Xg.var(0).numpy(), 1.0, atol=0.05)


@pytest.mark.parametrize("noise_std", [0.0, 0.1, 0.5])
def test_noise_has_requested_std(setup, noise_std: float) -> None:
    # n = 2e5: the sample std has relative s.e. 1/sqrt(2n) ~ 0.16%, so a 1% tolerance cannot be
    # met by a noise std that is off by more than ~1.5%.
    X, y = sample(setup.true_model, setup.truth, 200_000, noise_std, 3)
    resid = y - setup.true_model.predict(setup.truth, X)
    if noise_std == 0.0:
        assert float(resid.abs().max()) == 0.0
    else:
        assert abs(float(resid.std()) / noise_std - 1) < 0.01
        assert abs(float(resid.mean())) < 5 * noise_std / np.sqrt(200_000)


def test_device_and_dtype_do_not_change_the_draw(setup, device: str) -> None:
    X64, y64 = sample(setup.true_model, setup.truth, 100, 0.1, 5)
    X32, y32 = sample(setup.true_model, setup.truth, 100, 0.1, 5, device=device, dtype=torch.float32)
    assert X32.dtype == torch.float32 and X32.device.type == device
    assert torch.equal(X32.cpu(), X64.float()) and torch.equal(y32.cpu(), y64.float())


def test_sample_batch_stacks_independent_sets(setup) -> None:
    seeds = [cell_seed(0, r) for r in range(3)]
    X, y = sample_batch(setup.true_model, setup.truth, 40, 0.1, seeds)
    assert X.shape == (3, 40, setup.true_model.input_dim) and y.shape == (3, 40)
    for r in range(3):
        Xr, yr = sample(setup.true_model, setup.truth, 40, 0.1, cell_seed(0, r))
        assert torch.equal(X[r], Xr) and torch.equal(y[r], yr)
    assert not torch.equal(X[0], X[1])


def test_cell_seed_depends_on_key_not_order() -> None:
    a = cell_seed(1, "shared", 1000, 2).generate_state(4)
    assert np.array_equal(a, cell_seed(1, "shared", 1000, 2).generate_state(4))
    others = [cell_seed(2, "shared", 1000, 2), cell_seed(1, "nonshared", 1000, 2), cell_seed(1, "shared", 1001, 2),
              cell_seed(1, "shared", 1000, 3)]
    for o in others:
        assert not np.array_equal(a, o.generate_state(4))


def test_bad_sample_arguments(setup) -> None:
    m, t = setup.true_model, setup.truth
    with pytest.raises(ValueError, match="n must be a positive integer, got 0"):
        sample(m, t, 0, 0.1, 0)
    with pytest.raises(ValueError, match="noise_std must be a finite non-negative number, got -0.1"):
        sample(m, t, 10, -0.1, 0)
    with pytest.raises(ValueError, match="unknown x_dist 'normal'"):
        sample(m, t, 10, 0.1, 0, x_dist="normal")
    with pytest.raises(ValueError, match="seed must be"):
        sample(m, t, 10, 0.1, -3)
    with pytest.raises(ValueError, match="truth must be unbatched"):
        sample(m, {k: v[None] for k, v in t.items()}, 10, 0.1, 0)
    with pytest.raises(ValueError, match="non-finite"):
        sample(m, dict(t, beta0=t["beta0"] * float("nan")), 10, 0.1, 0)
    with pytest.raises(ValueError, match="unknown device 'tpu'|unsupported device 'tpu'"):
        sample(m, t, 10, 0.1, 0, device="tpu")
    with pytest.raises(ValueError, match="root_seed"):
        cell_seed(-1, 0)
    with pytest.raises(ValueError, match="cell key"):
        cell_seed(0, 1.5)
    with pytest.raises(ValueError, match="seeds must not be empty"):
        sample_batch(m, t, 10, 0.1, [])
