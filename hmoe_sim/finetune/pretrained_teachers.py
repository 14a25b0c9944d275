"""The teachers of the pretrained-model experiment: hidden adapter updates of a frozen model (issues 14, 21).

Pure functions used by :mod:`hmoe_sim.finetune.pretrained_experiment`: :func:`make_teacher` (a
frozen copy of the base with a random update of a student family's structure), the size of an
update (:func:`embedding_shift`) and the target noise (:func:`noise_sd`, :func:`add_noise`).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from hmoe_sim._validation import check_positive_float
from hmoe_sim.finetune.sample_efficiency import StudentSpec
from hmoe_sim.hora.inject import inject_adapters
from hmoe_sim.hora.lora import HoRALinear, LoRALinear, MultiHeadLoRALinear

__all__ = ["add_noise", "embedding_shift", "make_teacher", "noise_sd"]


def embedding_shift(moved: torch.Tensor, base: torch.Tensor) -> float:
    """RMS displacement of the embeddings over their RMS spread around the mean.

    ``sqrt(mean_i |moved_i - base_i|^2) / sqrt(mean_i |base_i - mean_j base_j|^2)``: 0.5 means
    that each sentence moves, on average, by half the typical distance between a base
    embedding and the base embeddings' centre.
    """
    spread = (base - base.mean(0)).pow(2).sum(-1).mean().sqrt()
    return float((moved - base).pow(2).sum(-1).mean().sqrt() / spread)


def noise_sd(teacher: torch.Tensor, base: torch.Tensor, snr: float) -> float:
    """Noise standard deviation per coordinate for a signal-to-noise ratio ``snr``.

    The signal is the teacher's update of the embeddings: ``snr = mean((teacher - base)^2) /
    sd^2`` (mean over sentences and coordinates). ``snr = inf`` gives 0 (noise-free targets).
    """
    if not (isinstance(snr, int | float) and snr > 0):
        raise ValueError(f"snr must be a positive number (inf: no noise), got {snr!r}")
    return 0.0 if math.isinf(snr) else float(((teacher - base).pow(2).mean() / snr).sqrt())


def add_noise(clean: torch.Tensor, sd: float, seed: int) -> torch.Tensor:
    """``clean`` plus independent ``N(0, sd^2)`` noise (drawn in float64 from ``seed``, row-major)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(clean.shape, generator=gen, dtype=torch.float64)
    return clean + (check_positive_float("sd", sd, allow_zero=True) * noise).to(clean)


def make_teacher(base: nn.Module, spec: StudentSpec, *, scale: float, seed: int) -> nn.Module:
    """A frozen copy of ``base`` with a random hidden update of structure ``spec`` on every Q and V.

    ``A``-type factors are ``N(0, 1/E)`` and ``B``-type factors ``N(0, scale^2)``; for HoRA each
    variance is split evenly between the shared part and the generated part (whose ``m`` generator
    slices share it again), and the head embeddings are ``N(0, 1)``. ``E`` is
    ``base.config.hidden_size``.
    """
    module = copy.deepcopy(base)
    options = {"hyper_dim": spec.hyper_dim} if spec.adapter == "hora" else {}
    inject_adapters(module, spec.adapter, spec.rank, seed=seed, **options)
    gen = torch.Generator().manual_seed(seed)
    a_std = 1 / base.config.hidden_size ** 0.5

    def fill(p: torch.Tensor, std: float) -> None:
        p.copy_(std * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p))

    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, HoRALinear):
                m = layer.hyper_dim
                fill(layer.shared_A, a_std / 2 ** 0.5)
                fill(layer.generator_A, a_std / (2 * m) ** 0.5)
                fill(layer.shared_B, scale / 2 ** 0.5)
                fill(layer.generator_B, scale / (2 * m) ** 0.5)
                fill(layer.head_embeddings, 1.0)
            elif isinstance(layer, MultiHeadLoRALinear | LoRALinear):
                fill(layer.lora_A, a_std)
                fill(layer.lora_B, scale)
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
