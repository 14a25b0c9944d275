"""HoRA layers: multi-head attention with LoRA, MH-LoRA and HoRA adapters, tied to the theory.

* :mod:`hmoe_sim.hora.lora` -- adapters around a frozen ``nn.Linear``.
* :mod:`hmoe_sim.hora.attention` -- :class:`MultiHeadAttention` with adapters on Q and V.
* :mod:`hmoe_sim.hora.theory_link` -- the layer-exact regression function and the exact maps
  to :class:`hmoe_sim.models.hmoe.HMoE`.
* :mod:`hmoe_sim.hora.finetune` -- the sample-efficiency fine-tuning experiment.
"""

from hmoe_sim.hora.attention import ADAPTER_KINDS, PROJECTIONS, MultiHeadAttention, adapter_parameter_count
from hmoe_sim.hora.lora import AdapterLinear, HoRALinear, LoRALinear, MultiHeadLoRALinear
from hmoe_sim.hora.theory_link import (
    HeadWeights,
    head_weights,
    layer_regression_function,
    row_one_readout,
    to_frozen_attention,
    to_hmoe,
)

__all__ = [
    "ADAPTER_KINDS",
    "PROJECTIONS",
    "AdapterLinear",
    "HeadWeights",
    "HoRALinear",
    "LoRALinear",
    "MultiHeadAttention",
    "MultiHeadLoRALinear",
    "adapter_parameter_count",
    "head_weights",
    "layer_regression_function",
    "row_one_readout",
    "to_frozen_attention",
    "to_hmoe",
]
