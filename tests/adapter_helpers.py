"""Helpers shared by the adapter tests."""

from __future__ import annotations

import torch
from torch import nn


def randomize_trainable(module: nn.Module, seed: int, scale: float = 0.5) -> None:
    """Give every trainable tensor random nonzero values (so B factors are no longer zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
