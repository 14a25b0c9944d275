"""Is the pretrained-model comparison decided by the optimiser? Oracle starts and polished fits.

For one fit key of :class:`~hmoe_sim.finetune.pretrained_experiment.PretrainedExperiment`
(:func:`check_fit`):

* **default / adam** -- the experiment's fit itself (seeded start, mini-batch Adam, early
  stopping on the validation set; the row of the experiment's table);
* **default / polish** -- that early-stopped point polished to a minimum of the *training* loss by
  full-batch L-BFGS on the adapter tensors (:func:`~hmoe_sim.finetune.embedding_fit.fit_embeddings`),
  with its certificate: the max-abs gradient at the end over the one at the start
  (``grad_max / grad_start``; ``stop == "gradient"`` when it is below ``grad_rtol``);
* **oracle / start, adam, polish** -- only where the student's structure contains the teacher's
  (:func:`represents`: HoRA r=2, m=5 on the HoRA teacher, MH-LoRA r=1 on the MH-LoRA teacher): the
  student set to the teacher's factors (:func:`hmoe_sim.hora.peft_factors.copy_adapter_factors`), then the
  same Adam protocol, and the same polish.

Every row reports training MSE (noisy targets), best validation MSE where Adam ran and test MSE
(noise-free teacher embeddings), so the fits can be compared stage by stage: if the polished or the
oracle-started fits move HoRA's test MSE by more than the seed-to-seed interval, the comparison
measured the optimiser rather than the adapter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pandas as pd
import torch

from hmoe_sim._validation import check_positive_float, check_positive_int
from hmoe_sim.finetune.embedding_fit import fit_embeddings
from hmoe_sim.finetune.pretrained_experiment import FitKey, FitSetup, PretrainedExperiment
from hmoe_sim.finetune.pretrained_report import bootstrap_mean_ci
from hmoe_sim.finetune.sample_efficiency import StudentSpec

__all__ = ["CHECK_COLUMNS", "STAGES", "check_fit", "check_summary", "represents"]

#: the columns of one row of :func:`check_fit`
CHECK_COLUMNS = ("teacher", "adapter", "label", "n", "seed", "lr", "start", "stage", "train_mse", "val_mse",
                 "test_mse", "grad_start", "grad_max", "iterations", "evaluations", "stop", "converged", "seconds")
#: (start, stage) in the order :func:`check_fit` produces them
STAGES = (("default", "adam"), ("default", "polish"), ("oracle", "start"), ("oracle", "adam"), ("oracle", "polish"))


def represents(student: StudentSpec, teacher: StudentSpec) -> bool:
    """Whether the student's adapter can be set to the teacher's update exactly (same kind, rank and ``m``)."""
    same_m = student.adapter != "hora" or student.hyper_dim == teacher.hyper_dim
    return student.adapter == teacher.adapter and student.rank == teacher.rank and same_m


def _scores(experiment: PretrainedExperiment, module: torch.nn.Module, setup: FitSetup) -> dict[str, float]:
    index = torch.arange(setup.key.n, device=setup.targets.device)
    with torch.no_grad():
        train = sum(float((module.embed(h, m) - setup.targets[pos]).pow(2).sum())
                    for pos, h, m in experiment.train_chunks(setup)(index)) / setup.targets.numel()
    return {"train_mse": train, "test_mse": experiment.test_scores(module, setup.info)[0]}


def check_fit(experiment: PretrainedExperiment, key: FitKey, lr: float, *, polish_max_iter: int = 500,
              grad_rtol: float = 1e-3, progress: Callable[[str], None] | None = None) -> list[dict[str, object]]:
    """The stages of :data:`STAGES` for one fit key (oracle stages only where :func:`represents`).

    Parameters
    ----------
    experiment : PretrainedExperiment
    key : FitKey
    lr : float
        Adam's learning rate (the experiment's, chosen by its pilot).
    polish_max_iter : int
        L-BFGS iteration cap of a polish.
    grad_rtol : float
        The polish's certificate: max-abs gradient at most ``grad_rtol`` times its value at the
        polish's start.
    progress : callable, optional
        Receives one line per finished stage.

    Returns
    -------
    list of dict
        One row per stage with the columns :data:`CHECK_COLUMNS`.
    """
    check_positive_int("polish_max_iter", polish_max_iter)
    check_positive_float("grad_rtol", grad_rtol)
    from hmoe_sim.hora.peft_factors import copy_adapter_factors

    setup = experiment.setup(key)
    everything = torch.arange(key.n, device=setup.targets.device)
    base = {"teacher": key.teacher, "adapter": key.adapter, "label": setup.spec.label, "n": key.n, "seed": key.seed,
            "lr": lr}
    empty = {"val_mse": float("nan"), "grad_start": float("nan"), "grad_max": float("nan"), "iterations": 0,
             "evaluations": 0.0, "stop": "", "converged": True}
    starts = ["default"]
    if represents(setup.spec, experiment.config.teacher_spec(key.teacher)):
        starts.append("oracle")
    rows: list[dict[str, object]] = []

    def record(row: dict[str, object], clock: float) -> float:
        rows.append({**base, **empty, **row, "seconds": time.perf_counter() - clock})
        if progress is not None:
            last = rows[-1]
            progress(f"{tuple(key)} {last['start']}/{last['stage']}: train {last['train_mse']:.4g} test "
                     f"{last['test_mse']:.4g} iterations {last['iterations']} stop {last['stop']!r} "
                     f"{last['seconds']:.0f} s")
        return time.perf_counter()

    for start in starts:
        clock = time.perf_counter()
        student = experiment.student(setup)
        module = student.base_model.model
        if start == "oracle":
            copy_adapter_factors(setup.teacher_module, student)
            clock = record({"start": start, "stage": "start", **_scores(experiment, module, setup)}, clock)
        adam = experiment.adam(module, setup, lr)
        clock = record({"start": start, "stage": "adam", **adam,
                        "test_mse": experiment.test_scores(module, setup.info)[0]}, clock)
        polish = fit_embeddings(module, experiment.train_chunks(setup)(everything), setup.targets,
                                max_iter=polish_max_iter, grad_rtol=grad_rtol)
        record({"start": start, "stage": "polish", **polish,
                "test_mse": experiment.test_scores(module, setup.info)[0]}, clock)
    return [{name: row[name] for name in CHECK_COLUMNS} for row in rows]


def check_summary(rows: pd.DataFrame, *, n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Per teacher, student, ``n``, start and stage: mean training and test MSE with a bootstrap CI of the test
    MSE over seeds, the fraction of certified polishes and the median certificate ``grad_max / grad_start``."""
    out = []
    for (teacher, adapter, n, start, stage), cell in rows.groupby(["teacher", "adapter", "n", "start", "stage"],
                                                                 sort=False):
        low, high = bootstrap_mean_ci(cell["test_mse"].to_numpy(), n_boot=n_boot, seed=seed)
        ratio = (cell["grad_max"] / cell["grad_start"]).median() if stage == "polish" else float("nan")
        out.append({"teacher": teacher, "adapter": adapter, "label": cell["label"].iloc[0], "n": int(n),
                    "start": start, "stage": stage, "n_seeds": len(cell), "train_mse": float(cell["train_mse"].mean()),
                    "test_mse": float(cell["test_mse"].mean()), "test_mse_ci_low": low, "test_mse_ci_high": high,
                    "certified": float((cell["stop"] == "gradient").mean()) if stage == "polish" else float("nan"),
                    "median_grad_ratio": float(ratio), "median_iterations": float(cell["iterations"].median())})
    return pd.DataFrame(out)
