"""Is the MiniLM comparison decided by the optimiser? Oracle starts and L-BFGS-polished fits (needs '.[real]').

For every (teacher, student) at the given sizes and seeds, :func:`hmoe_sim.finetune.optimiser_check.check_fit`
reruns the experiment's Adam fit (through peft, at the learning rate its committed pilot chose), polishes it to a
certified minimum of the training loss by L-BFGS, and, where the student's structure contains the teacher's,
starts a second fit at the teacher's factors (oracle) and polishes that too. One CSV row per stage is appended
per finished fit key; a rerun skips the keys already there. ``--report-only`` rebuilds the summary
(``optimiser_summary.csv``) and prints the wide table; ``experiments/finetune_pretrained.py --report-only`` then
adds its polish and oracle columns to ``summary.csv``.

Usage::

    python experiments/finetune_pretrained_optimiser.py --n 256 --seeds 0 1 --workers 2
    python experiments/finetune_pretrained_optimiser.py --report-only
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
import torch

from hmoe_sim.finetune.optimiser_check import CHECK_COLUMNS, check_fit, check_summary
from hmoe_sim.finetune.pretrained_experiment import (
    TEACHERS,
    FitKey,
    PretrainedExperiment,
    PretrainedFinetuneConfig,
    config_summary,
    select_learning_rates,
)

RESULTS = Path(__file__).resolve().parent / "results/finetune_pretrained"
_WORKER: PretrainedExperiment | None = None


def _init_worker(config: PretrainedFinetuneConfig) -> None:
    global _WORKER
    torch.set_num_threads(1)
    _WORKER = PretrainedExperiment(config)


def _check(key: FitKey, lr: float, polish_max_iter: int) -> list[dict[str, object]]:
    assert _WORKER is not None
    return check_fit(_WORKER, key, lr, polish_max_iter=polish_max_iter, progress=lambda line: print(line, flush=True))


def wide_table(summary: pd.DataFrame) -> pd.DataFrame:
    """One line per (teacher, student, n): test and training MSE of each (start, stage)."""
    summary = summary.assign(column=summary["start"] + "_" + summary["stage"])
    index = ["teacher", "label", "n", "n_seeds"]
    test = summary.pivot_table(index=index, columns="column", values="test_mse", aggfunc="first", sort=False)
    train = summary.pivot_table(index=index, columns="column", values="train_mse", aggfunc="first", sort=False)
    adam = summary[summary["column"] == "default_adam"].set_index(index)
    out = test.add_suffix(" test").join(train.add_suffix(" train"))
    out["adam test CI"] = adam["test_mse_ci_low"].map("{:.3e}".format) + " - " + adam["test_mse_ci_high"].map(
        "{:.3e}".format)
    out["polish certified"] = summary[summary["column"] == "default_polish"].set_index(index)["certified"]
    return out.reset_index()


def per_seed(rows: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """One line per checked fit key: test and training MSE of every stage, and the committed table's test MSE."""
    rows = rows.assign(column=rows["start"] + "_" + rows["stage"])
    key = ["teacher", "adapter", "n", "seed"]
    wide = rows.pivot_table(index=key, columns="column", values=["test_mse", "train_mse"], aggfunc="first",
                            sort=False)
    wide.columns = [f"{column} {metric.removesuffix('_mse')}" for metric, column in wide.columns]
    committed = table.set_index(key)["test_mse"].rename("table test")
    ratio = (rows[rows["stage"] == "polish"].set_index([*key, "start"])
             .eval("grad_max / grad_start").unstack("start").add_prefix("grad ratio "))
    return wide.join(committed).join(ratio).reset_index()


def report(path: Path) -> None:
    rows = pd.read_csv(path)
    table = pd.read_csv(RESULTS / "finetune_pretrained.csv")
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(per_seed(rows, table).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    summary = check_summary(rows)
    out = path.with_name("optimiser_summary.csv")
    summary.to_csv(out, index=False)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(wide_table(summary).to_string(index=False, float_format=lambda v: f"{v:.3e}"))
    print(f"{rows[['teacher', 'adapter', 'n', 'seed']].drop_duplicates().shape[0]} fit keys; polish stops "
          f"{rows.loc[rows['stage'] == 'polish', 'stop'].value_counts().to_dict()}; wrote {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[256], help="training-set sizes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="replicate seeds (of the committed run)")
    parser.add_argument("--cells", nargs="+", metavar="TEACHER:ADAPTER",
                        help="run only these (teacher, student) cells, in this order (default: all)")
    parser.add_argument("--polish-max-iter", type=int, default=500, help="L-BFGS iteration cap of a polish")
    parser.add_argument("--workers", type=int, default=1, help="processes of one torch thread each")
    parser.add_argument("--out", type=Path, default=RESULTS / "optimiser_check.csv")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if args.report_only:
        report(args.out)
        return
    config = PretrainedFinetuneConfig()
    committed = json.loads((RESULTS / "finetune_pretrained.json").read_text(encoding="utf-8"))
    changed = sorted(k for k, v in config_summary(config).items() if committed.get(k) != v)
    if changed:
        raise SystemExit(f"the default configuration differs from the committed run in {changed}")
    rates = select_learning_rates(pd.read_csv(RESULTS / "finetune_pretrained_lr_pilot.csv"))
    done = pd.read_csv(args.out) if args.out.exists() else pd.DataFrame(columns=list(CHECK_COLUMNS))
    finished = {FitKey(t, a, int(n), int(s)) for t, a, n, s in
                done[["teacher", "adapter", "n", "seed"]].drop_duplicates().itertuples(index=False)}
    cells = [(t, s.adapter) for t in TEACHERS for s in config.students]
    if args.cells:
        chosen = [tuple(cell.split(":", 1)) for cell in args.cells]
        unknown = [cell for cell in chosen if cell not in cells]
        if unknown:
            parser.error(f"unknown cells {unknown}; expected TEACHER:ADAPTER among {cells}")
        cells = chosen
    keys = [FitKey(t, a, n, seed) for seed in args.seeds for n in args.n for t, a in cells]
    tasks = [(key, rates[key.teacher, key.adapter]) for key in keys if key not in finished]
    print(f"{len(tasks)} of {len(keys)} fit keys to run with {args.workers} worker(s) into {args.out}", flush=True)
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    new = not args.out.exists()
    with args.out.open("a", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(CHECK_COLUMNS))
        if new:
            writer.writeheader()
        with ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=(config,)) as pool:
            futures = [pool.submit(_check, key, lr, args.polish_max_iter) for key, lr in tasks]
            for future in futures:
                for row in future.result():
                    writer.writerow(row)
                    print(" ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c])
                                   for c in CHECK_COLUMNS), flush=True)
                file.flush()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"done: wall {time.perf_counter() - start:.0f} s, CPU {time.process_time() - cpu:.0f} s in this process and "
          f"{children.ru_utime + children.ru_stime:.0f} s in {args.workers} worker process(es)", flush=True)
    report(args.out)


if __name__ == "__main__":
    main()
