"""Device and dtype resolution (never touches CUDA for a CPU run), and the memory a CPU run may use."""

from __future__ import annotations

import os

import torch

__all__ = ["cpu_available_memory", "resolve_device", "resolve_dtype", "cuda_available"]

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


def _read_int(path: str) -> int | None:
    """The integer a one-value file holds (``None`` when missing, unreadable or e.g. ``max``)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def cpu_available_memory() -> int:
    """Memory this process can still use, in bytes: the least of what applies.

    ``MemAvailable`` of ``/proc/meminfo``, the address-space limit (``RLIMIT_AS``, when set)
    and the cgroup's limit less its usage (cgroup v2 ``memory.max`` / ``memory.current``, or
    v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``); physical RAM when none is known.

    Returns
    -------
    int
    """
    import resource

    candidates = [int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY and soft > 0:
        candidates.append(int(soft))
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None and limit < 1 << 60:
            candidates.append(max(0, limit - (_read_int(usage_file) or 0)))
            break
    return min(candidates)
