"""Data generation: ``Y = f_{G*}(X) + eps``, reproducible bit for bit from a seed.

Inputs and noise are drawn with NumPy's ``Generator`` (PCG64) in float64 on the CPU and
the regression function is evaluated in float64 on the CPU, whatever the requested
``device``/``dtype``: the same seed therefore gives the same data on every device, and
results differ between devices only through the fits.

Seeds for many cells derive from one root seed with :func:`cell_seed`, which uses
``numpy.random.SeedSequence`` spawn keys: a cell's seed depends only on the root seed and
the cell's key, never on the order in which cells run.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from hmoe_sim._validation import check_choice, check_positive_float, check_positive_int
from hmoe_sim.devices import resolve_device
from hmoe_sim.models.base import MixtureModel, Params

__all__ = ["sample", "sample_batch", "cell_seed", "as_generator", "draw_inputs", "X_DISTRIBUTIONS", "SeedLike"]

X_DISTRIBUTIONS = ("uniform", "gaussian")
SeedLike = int | np.random.SeedSequence | np.random.Generator


def cell_seed(root_seed: int, *key: int | str) -> np.random.SeedSequence:
    """Seed of one sweep cell, derived from the root seed and the cell's key.

    Parameters
    ----------
    root_seed : int
        Non-negative root seed of the sweep.
    *key : int or str
        The cell's coordinates (e.g. ``"shared", 1000, 3``). Strings are mapped to
        integers with CRC-32, which is stable across Python runs (unlike ``hash``).
    """
    if isinstance(root_seed, bool) or not isinstance(root_seed, int | np.integer) or root_seed < 0:
        raise ValueError(f"root_seed must be a non-negative integer, got {root_seed!r}")
    spawn_key: list[int] = []
    for part in key:
        if isinstance(part, str):
            spawn_key.append(zlib.crc32(part.encode()))
        elif isinstance(part, int | np.integer) and not isinstance(part, bool) and part >= 0:
            spawn_key.append(int(part))
        else:
            raise ValueError(f"cell key parts must be non-negative ints or strings, got {part!r}")
    return np.random.SeedSequence(int(root_seed), spawn_key=tuple(spawn_key))


def as_generator(seed: SeedLike) -> np.random.Generator:
    """The numpy ``Generator`` a seed stands for (a ``Generator`` is returned as it is).

    Parameters
    ----------
    seed : int, numpy.random.SeedSequence or numpy.random.Generator
        A non-negative int or a ``SeedSequence`` seeds a new ``default_rng``.

    Returns
    -------
    numpy.random.Generator

    Raises
    ------
    ValueError
        ``seed`` is none of these (a negative int or a bool included).
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, np.random.SeedSequence):
        return np.random.default_rng(seed)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, a SeedSequence or a Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def draw_inputs(rng: np.random.Generator, n: int, d: int, x_dist: str = "uniform") -> np.ndarray:
    """``(n, d)`` float64 inputs from ``Uniform([-1, 1]^d)`` or ``N(0, I_d)``, drawn from ``rng``.

    The one input draw of the package: :func:`sample` and the fixed evaluation sample of
    :func:`hmoe_sim.losses.eval_sample` both use it.
    """
    check_choice("x_dist", x_dist, X_DISTRIBUTIONS)
    return rng.uniform(-1.0, 1.0, size=(n, d)) if x_dist == "uniform" else rng.standard_normal((n, d))


def sample(
    model: MixtureModel,
    truth: Params,
    n: int,
    noise_std: float,
    seed: SeedLike,
    *,
    x_dist: str = "uniform",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``n`` pairs ``(X_i, Y_i)`` with ``Y_i = f_{G*}(X_i) + noise_std * N(0, 1)``.

    Parameters
    ----------
    model : MixtureModel
        The true model.
    truth : dict of torch.Tensor
        Unbatched true parameters of ``model``.
    n : int
        Sample size.
    noise_std : float
        Noise standard deviation (``0`` gives noise-free data).
    seed : int, SeedSequence or Generator
        Source of randomness; the same seed gives the same data bit for bit.
    x_dist : {"uniform", "gaussian"}
        ``Uniform([-1, 1]^D)`` (default) or ``N(0, I_D)``.
    device, dtype
        Where and in which precision the returned tensors live.

    Returns
    -------
    X : torch.Tensor
        ``(n, D)``.
    y : torch.Tensor
        ``(n,)``.
    """
    n = check_positive_int("n", n)
    noise_std = check_positive_float("noise_std", noise_std, allow_zero=True)
    check_choice("x_dist", x_dist, X_DISTRIBUTIONS)
    device = resolve_device(device)
    if model.batch_shape(truth) != torch.Size([]):
        raise ValueError(f"truth must be unbatched, got batch shape {tuple(model.batch_shape(truth))}")
    rng = as_generator(seed)
    x = draw_inputs(rng, n, model.input_dim, x_dist)
    noise = rng.standard_normal(n)
    X64 = torch.from_numpy(x)
    f = model.predict(model.cast(truth, device="cpu", dtype=torch.float64), X64)
    y64 = f + noise_std * torch.from_numpy(noise)
    return X64.to(device=device, dtype=dtype), y64.to(device=device, dtype=dtype)


def sample_batch(
    model: MixtureModel,
    truth: Params,
    n: int,
    noise_std: float,
    seeds: Sequence[SeedLike],
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Several independent data sets stacked: ``X (R, n, D)``, ``y (R, n)``.

    Data set ``r`` equals ``sample(model, truth, n, noise_std, seeds[r], **kwargs)``.
    """
    if len(seeds) == 0:
        raise ValueError("seeds must not be empty")
    pairs = [sample(model, truth, n, noise_std, s, **kwargs) for s in seeds]  # type: ignore[arg-type]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
