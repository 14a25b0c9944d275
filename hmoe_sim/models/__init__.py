"""Regression models: flat MoE (sibling papers) and the two-level HMoE (HoRA)."""

from hmoe_sim.models.base import MixingMeasure, MixtureModel, Params
from hmoe_sim.models.flat import EXPERT_FUNCTIONS, GATES, FlatMoE
from hmoe_sim.models.hmoe import CODE_ACTIVATIONS, FIRST_LEVEL_GATES, STRUCTURES, FrozenAttention, HMoE
from hmoe_sim.models.presets import PRESETS, Setup, make_preset, preset_defaults

__all__ = [
    "CODE_ACTIVATIONS",
    "EXPERT_FUNCTIONS",
    "FIRST_LEVEL_GATES",
    "GATES",
    "PRESETS",
    "STRUCTURES",
    "FlatMoE",
    "FrozenAttention",
    "HMoE",
    "MixingMeasure",
    "MixtureModel",
    "Params",
    "Setup",
    "make_preset",
    "preset_defaults",
]
