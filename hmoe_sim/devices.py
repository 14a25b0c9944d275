"""Device and dtype resolution (never touches CUDA for a CPU run)."""

from __future__ import annotations

import torch

__all__ = ["resolve_device", "resolve_dtype", "cuda_available"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def cuda_available() -> bool:
    """Whether a CUDA device can be used."""
    return torch.cuda.is_available()


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Turn ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"gpu"`` or a ``torch.device`` into a device.

    Raises
    ------
    ValueError
        Unknown device string, or CUDA requested where none is available.
    """
    if device is None:
        return torch.device("cpu")
    if isinstance(device, str) and device == "gpu":
        device = "cuda"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:<index>'") from err
    if dev.type == "cuda":
        if not cuda_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float64"`` (or the torch dtypes) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32 or float64")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use 'float32' or 'float64'")
    return _DTYPES[dtype]
