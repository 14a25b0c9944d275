"""What the tests may assert exactly, and what only to round-off.

The package guarantees bit-for-bit equality only where the same floating-point operations run on
the same shapes with the same number of threads: the same config rerun, resumed after a kill, or
spread over other jobs or backends (each cell fixes its torch threads), and everything drawn from a
seed (data, truths, starts). Anything that changes the shape of a batched product or reduction (the
size of a chunk, the rows of a stack that are still iterating, the thread count) may change its
rounding, because BLAS and torch's parallel reductions pick kernels and split sums by shape and
threads. Such comparisons use the tolerances below: far below any statistical quantity, far above
float64 round-off of a handful of LM steps.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

RTOL = 1e-7
"""Relative tolerance between two runs that differ only in how work is cut."""

ATOL = 1e-12
"""Absolute tolerance for values at round-off (noise-free controls reach 1e-16)."""


def assert_tensors_match(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = RTOL,
                         atol: float = ATOL) -> None:
    """Assert two tensors agree to round-off: same shape and dtype, NaN where the other is NaN."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True)


def assert_frames_match(actual: pd.DataFrame, expected: pd.DataFrame, *, rtol: float = RTOL,
                        atol: float = ATOL) -> None:
    """Assert two result tables agree: every non-float column exactly, float columns to round-off."""
    actual = actual.reset_index(drop=True)
    expected = expected.reset_index(drop=True)
    assert list(actual.columns) == list(expected.columns)
    floats = [c for c in expected.columns if pd.api.types.is_float_dtype(expected[c])]
    others = [c for c in expected.columns if c not in floats]
    pd.testing.assert_frame_equal(actual[others], expected[others], check_exact=True)
    for column in floats:
        a, b = actual[column].to_numpy(dtype=float), expected[column].to_numpy(dtype=float)
        ok = np.isclose(a, b, rtol=rtol, atol=atol, equal_nan=True)
        assert ok.all(), f"{column}: rows {np.flatnonzero(~ok).tolist()} differ beyond round-off ({a[~ok]} vs {b[~ok]})"
