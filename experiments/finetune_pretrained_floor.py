"""How close can each student get to a teacher with noise-free targets on the whole training split? (issue 21)

The check behind the shared teacher's claim: a HoRA update (r=2, m=5) has rank 12 on Q and V,
so LoRA at the students' rank 6 cannot represent it and should stay at a floor, while HoRA
(whose family contains the teacher) should not. Every student is fitted by mini-batch Adam to
the teacher's noise-free embeddings of all training sentences of the experiment's corpus
(pool and validation sentences together), with early stopping on the noise-free test split,
and the training and test MSE at the best point are reported beside the frozen model's. Rows
of other (teacher, adapter) pairs already in ``--out`` are kept.

Usage::

    python experiments/finetune_pretrained_floor.py                       # shared teacher, lora and hora
    python experiments/finetune_pretrained_floor.py --adapters lora mh-lora hora --teacher independent
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import pandas as pd
import torch

from hmoe_sim.finetune.embedding_fit import fit_embeddings_adam
from hmoe_sim.finetune.pretrained_experiment import PretrainedExperiment, PretrainedFinetuneConfig
from hmoe_sim.hora.inject import inject_adapters

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="shared", choices=["shared", "independent"])
    parser.add_argument("--adapters", nargs="+", default=["lora", "hora"])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/finetune_pretrained/floor_check.csv")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = PretrainedFinetuneConfig()
    experiment = PretrainedExperiment(config, progress=print)
    _, info = experiment.teacher(args.teacher)
    data, chunk = experiment.train_data, config.chunk_size
    rows = []
    for adapter in args.adapters:
        spec = {s.adapter: s for s in config.students}[adapter]
        start, cpu = time.perf_counter(), time.process_time()
        student = copy.deepcopy(experiment.base)
        options = {"hyper_dim": spec.hyper_dim} if adapter == "hora" else {}
        inject_adapters(student, adapter, spec.rank, seed=0, **options)
        fit = fit_embeddings_adam(student, lambda sub: data.chunks(experiment.all_train[sub], chunk), len(data),
                                  info.train, experiment.test_data.chunks(experiment.test_index, chunk), info.test,
                                  lr=args.lr, batch_size=args.batch_size, max_steps=args.max_steps, eval_every=20,
                                  patience=15, seed=0)
        base_train = float((experiment.base_train - info.train).pow(2).mean())
        row = {"teacher": args.teacher, "adapter": adapter, "label": spec.label, "n_train": len(data),
               "train_mse": fit["train_mse"], "base_train_mse": base_train,
               "train_floor_fraction": fit["train_mse"] / base_train, "test_mse": fit["val_mse"],
               "base_test_mse": info.base_test_mse, "steps": fit["iterations"], "best_step": fit["best_step"],
               "stop": fit["stop"], "lr": args.lr, "seconds": time.perf_counter() - start,
               "cpu_seconds": time.process_time() - cpu}
        rows.append(row)
        print(row, flush=True)
    table = pd.DataFrame(rows)
    if args.out.exists():  # keep the rows of other (teacher, adapter) pairs
        old = pd.read_csv(args.out)
        keep = ~old.set_index(["teacher", "adapter"]).index.isin(table.set_index(["teacher", "adapter"]).index)
        table = pd.concat([old[keep], table], ignore_index=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table


if __name__ == "__main__":
    main()
