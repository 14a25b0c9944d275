"""Copy adapter factors from a model adapted by :func:`hmoe_sim.hora.inject_adapters` into a peft model.

The bridge between the package's own injection and its peft method (:mod:`hmoe_sim.hora.peft`): the
MiniLM experiment's peft students start from the package's seeded factors, the oracle starts of its
optimiser check from a teacher's factors, and the tests compare the two paths with the same factors.
Needs peft (the ``real`` extra).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hmoe_sim.hora.lora import AdapterLinear, HoRALinear, LoRALinear, MultiHeadLoRALinear
from hmoe_sim.hora.peft import BaseTunerLayer, HoraLayer  # peft's class, after hora.peft's version check

__all__ = ["copy_adapter_factors"]


@torch.no_grad()
def copy_adapter_factors(source: nn.Module, target: nn.Module, adapter_name: str = "default") -> int:
    """Copy the factors of adapters put on by :func:`hmoe_sim.hora.inject_adapters` into a peft model's adapters.

    Modules are matched by name (the peft model's ``base_model.model.`` prefix dropped):
    ``LoRALinear`` -> peft ``lora.Linear`` (``lora_A``, ``lora_B``), ``MultiHeadLoRALinear`` ->
    :class:`HoraLinear` of structure ``"nonshared"``, ``HoRALinear`` -> ``"shared"``. The scalings
    must agree.

    Returns
    -------
    int
        The number of adapted projections copied.

    Raises
    ------
    ValueError
        When a source adapter has no counterpart of the same kind, shape and scaling in ``target``.
    """
    def strip(name: str) -> str:
        for prefix in ("base_model.model.", "model."):
            if name.startswith(prefix):
                return name[len(prefix):]
        return name

    targets = {strip(name): module for name, module in target.named_modules() if isinstance(module, BaseTunerLayer)}
    copied = 0
    for name, layer in source.named_modules():
        if not isinstance(layer, AdapterLinear):
            continue
        other = targets.get(name)
        if other is None:
            raise ValueError(f"no peft adapter layer named {name!r} in the target model")
        if isinstance(layer, LoRALinear):
            if adapter_name not in getattr(other, "lora_A", {}):
                raise ValueError(f"{name!r}: the target has no peft LoRA adapter {adapter_name!r}")
            pairs = [(layer.lora_A, other.lora_A[adapter_name].weight),
                     (layer.lora_B, other.lora_B[adapter_name].weight)]
            scaling = other.scaling[adapter_name]
        else:
            if not isinstance(other, HoraLayer) or adapter_name not in other.hora_A:
                raise ValueError(f"{name!r}: the target has no HoRA adapter {adapter_name!r}")
            structure = other.structure[adapter_name]
            if isinstance(layer, MultiHeadLoRALinear) and structure == "nonshared":
                pairs = [(layer.lora_A, other.hora_A[adapter_name]), (layer.lora_B, other.hora_B[adapter_name])]
            elif isinstance(layer, HoRALinear) and structure == "shared":
                pairs = [(layer.shared_A, other.hora_A[adapter_name]), (layer.shared_B, other.hora_B[adapter_name]),
                         (layer.generator_A, other.hora_generator_A[adapter_name]),
                         (layer.generator_B, other.hora_generator_B[adapter_name]),
                         (layer.head_embeddings, other.hora_embedding[adapter_name])]
            else:
                raise ValueError(f"{name!r}: a {type(layer).__name__} cannot be copied into a HoRA adapter of "
                                 f"structure {structure!r}")
            scaling = other.scaling[adapter_name]
        for src, dst in pairs:
            if dst is None or tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{name!r}: source factor {tuple(src.shape)} has no target of the same shape")
            dst.copy_(src)
        if scaling is None or not math.isclose(scaling, layer.scaling, rel_tol=1e-12):
            raise ValueError(f"{name!r}: the source scaling {layer.scaling} differs from the target's {scaling}")
        copied += 1
    if not copied:
        raise ValueError(f"{type(source).__name__} holds no adapters of the package (call inject_adapters first)")
    return copied
