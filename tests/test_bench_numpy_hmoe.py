"""The benchmark anchor's NumPy HMoE (experiments/numpy_hmoe.py) against the torch model: the
regression function and the Jacobian to 1e-12, every structure, code map and first level."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hmoe_sim.models.hmoe import FrozenAttention, HMoE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from numpy_hmoe import HMoEResidual, HMoESpec  # noqa: E402

CASES = [(s, act, gate) for s in ("nonshared", "shared") for act in ("identity", "tanh")
         for gate in ("uniform", "softmax")]


@pytest.mark.parametrize(("structure", "code_activation", "first_level"), CASES)
def test_numpy_hmoe_matches_the_torch_model(structure, code_activation, first_level):
    att = FrozenAttention.from_seed(5, n_heads=3, token_dim=2, key_dim=2, value_dim=3)
    model = HMoE(att, n_tokens=3, n_adapters=2, structure=structure, code_dim=2,
                 code_activation=code_activation, first_level=first_level)
    g = torch.Generator().manual_seed(7)
    params = {k: 0.8 * torch.randn(*s, generator=g, dtype=torch.float64) for k, s in model.param_shapes().items()}
    X = 2 * torch.rand(60, model.input_dim, generator=g, dtype=torch.float64) - 1
    y = torch.randn(60, generator=g, dtype=torch.float64)
    f, J = model.value_and_jacobian(params, X)
    res = HMoEResidual(HMoESpec.of(model), X.numpy(), y.numpy())
    theta = model.flatten(params).numpy()
    np.testing.assert_allclose(res.residual(theta), (f - y).numpy(), rtol=0, atol=1e-12 * float(f.abs().max()))
    J_np = res.jacobian(theta)
    assert J_np.shape == tuple(J.shape)
    assert np.abs(J_np - J.numpy()).max() <= 1e-12 * float(J.abs().max())
    # the truncated problem is the same problem on fewer samples
    np.testing.assert_array_equal(res.head(10).residual(theta), res.residual(theta)[:10])


def test_numpy_hmoe_rejects_a_vector_of_the_wrong_size():
    att = FrozenAttention.from_seed(5, n_heads=2, token_dim=2, key_dim=2, value_dim=2)
    model = HMoE(att, n_tokens=2, n_adapters=1)
    res = HMoEResidual(HMoESpec.of(model), np.zeros((3, 4)), np.zeros(3))
    with pytest.raises(ValueError, match="theta has 5 entries"):
        res.residual(np.zeros(5))
