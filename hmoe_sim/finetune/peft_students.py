"""The pretrained-model experiment's students, built through peft.

LoRA is peft's own (``peft.LoraConfig``), MH-LoRA and HoRA are :class:`hmoe_sim.hora.peft.HoraConfig`
(structures ``"nonshared"`` and ``"shared"``); all adapt the query and value projections with
scaling 1 (``lora_alpha = r``). peft initialises LoRA's ``A`` from torch's global random
state, so a student's initial factors are instead the package's seeded ones
(:func:`hmoe_sim.hora.inject_adapters` with the fit's seed), copied in by
:func:`hmoe_sim.hora.peft_factors.copy_adapter_factors`: the fit depends on its key only, and a student
starts where the committed (pre-peft) fits started.
"""

from __future__ import annotations

import copy

from torch import nn

from hmoe_sim.finetune.sample_efficiency import StudentSpec
from hmoe_sim.hora.inject import inject_adapters

__all__ = ["TARGET_MODULES", "peft_config", "peft_student", "trainable_count"]

#: the adapted projections (BERT names)
TARGET_MODULES = ("query", "value")


def peft_config(spec: StudentSpec) -> object:
    """The peft configuration of a student: ``LoraConfig`` for ``lora``, ``HoraConfig`` for ``mh-lora`` / ``hora``."""
    if spec.adapter == "lora":
        import peft

        return peft.LoraConfig(r=spec.rank, lora_alpha=spec.rank, lora_dropout=0.0, target_modules=list(TARGET_MODULES))
    from hmoe_sim.hora.peft import HoraConfig

    if spec.adapter == "mh-lora":
        return HoraConfig(r=spec.rank, structure="nonshared", target_modules=list(TARGET_MODULES))
    return HoraConfig(r=spec.rank, hyper_dim=spec.hyper_dim, structure="shared", target_modules=list(TARGET_MODULES))


def peft_student(base: nn.Module, spec: StudentSpec, seed: int) -> nn.Module:
    """``peft.get_peft_model`` on a copy of ``base``, starting from the package's seeded initial factors.

    Parameters
    ----------
    base : torch.nn.Module
        The frozen model (not changed).
    spec : StudentSpec
        The student's adapter.
    seed : int
        Seed of the initial factors (as in ``inject_adapters(..., seed=seed)``).

    Returns
    -------
    peft.PeftModel
        Only the adapter tensors trainable.
    """
    import peft

    from hmoe_sim.hora.peft_factors import copy_adapter_factors

    reference = copy.deepcopy(base)
    options = {"hyper_dim": spec.hyper_dim} if spec.adapter == "hora" else {}
    inject_adapters(reference, spec.adapter, spec.rank, targets=TARGET_MODULES, seed=seed, **options)
    student = peft.get_peft_model(copy.deepcopy(base), peft_config(spec))
    copy_adapter_factors(reference, student)
    return student


def trainable_count(student: nn.Module) -> int:
    """Trainable scalars of a peft model, each shared tensor once (what ``print_trainable_parameters`` prints)."""
    return int(student.get_nb_trainable_parameters()[0])
