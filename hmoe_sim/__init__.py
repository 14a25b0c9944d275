"""hmoe-sim: simulation checks of the HoRA theory (hierarchical mixtures of experts)."""

from hmoe_sim.data import cell_seed, sample, sample_batch
from hmoe_sim.models import FlatMoE, FrozenAttention, HMoE, MixingMeasure, Setup, make_preset

__version__ = "0.1.0"

__all__ = [
    "FlatMoE",
    "FrozenAttention",
    "HMoE",
    "MixingMeasure",
    "Setup",
    "cell_seed",
    "make_preset",
    "sample",
    "sample_batch",
]
