"""The fits of the pretrained-model experiment and their resumption (issue 21).

A fit is a :class:`FitKey` ``(teacher, adapter, n, seed)``; the learning-rate pilot is a list of
``(key, learning rate)`` on :data:`PILOT_SEED`. These functions only order, filter and choose:
the fitting is :class:`hmoe_sim.finetune.pretrained_experiment.PretrainedExperiment`'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol

import pandas as pd

from hmoe_sim._validation import check_choice

__all__ = ["PILOT_SEED", "TEACHERS", "FitKey", "pending_fits", "pending_pilot", "plan_fits", "plan_pilot",
           "select_learning_rates"]

TEACHERS = ("shared", "independent")
#: the seed of the learning-rate pilot fits (its pool, noise and initialisation; no replicate uses it)
PILOT_SEED = 1_000_000


class PlanConfig(Protocol):
    """What the plan reads of :class:`hmoe_sim.finetune.pretrained_experiment.PretrainedFinetuneConfig`
    (a protocol, so that this module does not import the experiment that imports it)."""

    n_seeds: int
    n_grid: tuple[int, ...]
    students: tuple[Any, ...]
    pilot_n: int
    lr_grid: tuple[float, ...]


class FitKey(NamedTuple):
    """One fit: teacher name, student adapter kind, training-set size, seed."""

    teacher: str
    adapter: str
    n: int
    seed: int


def plan_fits(config: PlanConfig, teachers: Sequence[str] = TEACHERS) -> list[FitKey]:
    """Every fit, seed-major (seed, then teacher, student, n), so a partial run is balanced across cells."""
    teachers = [check_choice("teacher", t, TEACHERS) for t in teachers]
    return [FitKey(t, s.adapter, n, seed) for seed in range(config.n_seeds) for t in teachers
            for s in config.students for n in config.n_grid]


def pending_fits(plan: Iterable[FitKey], done: pd.DataFrame | None) -> list[FitKey]:
    """The fits of ``plan`` that have no row in ``done`` (keyed by teacher, adapter, n, seed), in plan order."""
    if done is None or done.empty:
        return list(plan)
    missing = {"teacher", "adapter", "n", "seed"} - set(done.columns)
    if missing:
        raise ValueError(f"the finished table lacks the key columns {sorted(missing)}")
    finished = {FitKey(str(t), str(a), int(n), int(s))
                for t, a, n, s in done[["teacher", "adapter", "n", "seed"]].itertuples(index=False)}
    return [key for key in plan if key not in finished]


def plan_pilot(config: PlanConfig, teachers: Sequence[str] = TEACHERS) -> list[tuple[FitKey, float]]:
    """The learning-rate pilot: every (teacher, student, learning rate) at ``n = pilot_n`` on :data:`PILOT_SEED`."""
    teachers = [check_choice("teacher", t, TEACHERS) for t in teachers]
    return [(FitKey(t, s.adapter, config.pilot_n, PILOT_SEED), lr) for t in teachers for s in config.students
            for lr in config.lr_grid]


def pending_pilot(plan: Iterable[tuple[FitKey, float]], done: pd.DataFrame | None) -> list[tuple[FitKey, float]]:
    """The pilot fits of ``plan`` without a row in ``done`` (keyed by teacher, adapter, lr), in plan order."""
    if done is None or done.empty:
        return list(plan)
    finished = {(str(t), str(a), float(lr)) for t, a, lr in done[["teacher", "adapter", "lr"]].itertuples(index=False)}
    return [(key, lr) for key, lr in plan if (key.teacher, key.adapter, float(lr)) not in finished]


def select_learning_rates(pilot: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Per (teacher, adapter): the pilot's learning rate with the lowest validation MSE (ties: the smaller rate)."""
    missing = {"teacher", "adapter", "lr", "val_mse"} - set(pilot.columns)
    if missing:
        raise ValueError(f"the pilot table lacks the columns {sorted(missing)}")
    ordered = pilot.sort_values(["teacher", "adapter", "val_mse", "lr"], kind="stable")
    return {(str(t), str(a)): float(group["lr"].iloc[0]) for (t, a), group in ordered.groupby(["teacher", "adapter"])}
