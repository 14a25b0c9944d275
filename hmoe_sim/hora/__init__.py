"""HoRA layers: multi-head attention with LoRA, MH-LoRA and HoRA adapters, tied to the theory.

* :mod:`hmoe_sim.hora.lora` -- adapters around a frozen ``nn.Linear``.
* :mod:`hmoe_sim.hora.attention` -- :class:`MultiHeadAttention` with adapters on Q and V.
* :mod:`hmoe_sim.hora.theory_link` -- the layer-exact regression function and the exact maps
  to :class:`hmoe_sim.models.hmoe.HMoE`.
* :mod:`hmoe_sim.hora.inject` -- adapters put on an existing model's attention, in place
  (Hugging Face BERT-family self-attention and ``nn.MultiheadAttention``).
* :mod:`hmoe_sim.hora.peft` -- HoRA and MH-LoRA as a peft method (``HoraConfig``; optional
  extra ``real``; imported on its own, not by this package, so that peft stays optional).
* :mod:`hmoe_sim.hora.pretrained` -- all-MiniLM-L6-v2 and the ``pydoc_data`` sentences, offline
  (optional extra ``real``).

The fine-tuning experiments built on these layers are in :mod:`hmoe_sim.finetune`.
"""

from hmoe_sim.hora.attention import ADAPTER_KINDS, PROJECTIONS, MultiHeadAttention, adapter_parameter_count
from hmoe_sim.hora.inject import (
    INJECT_KINDS,
    MultiheadAttentionAdapter,
    attention_blocks,
    inject_adapters,
    merge_adapters,
    trainable_parameters,
    unmerge_adapters,
)
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
    "INJECT_KINDS",
    "PROJECTIONS",
    "AdapterLinear",
    "HeadWeights",
    "HoRALinear",
    "LoRALinear",
    "MultiHeadAttention",
    "MultiHeadLoRALinear",
    "MultiheadAttentionAdapter",
    "adapter_parameter_count",
    "attention_blocks",
    "head_weights",
    "inject_adapters",
    "layer_regression_function",
    "merge_adapters",
    "row_one_readout",
    "to_frozen_attention",
    "to_hmoe",
    "trainable_parameters",
    "unmerge_adapters",
]
