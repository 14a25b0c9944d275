"""Where a sweep's time goes, LM step by LM step (issue 18): every cell of a configuration computed in
this process (each at the configuration's ``threads`` torch threads, 1 by default, as in a sweep's
workers), with each LM iteration timed and split.

For every cell: its wall time and the part in ``fit_batch``. For every LM iteration (``_iterate`` of
the solver): its time, the number of problems in the stack, and how many of them end at the
iteration cap (known once the cell is done). The iteration's time is split into the linearisation
(``Problem.linearize``: the model and its Jacobian blocks at the candidates), the normal equations
(``Linearization.normal_equations``, of which the factor Gram ``factor_gram``) and the rest (the LM's
own bookkeeping: damping, Cholesky, gain ratio, stopping tests). The timers wrap the library's
private functions from outside (this script only; the library is unchanged), so the split is the
library's own and costs a few microseconds per call.

The cells run one after the other in one process, so their sum is the sweep's serial CPU time; with
``--jobs 2`` on two cores the sweep's wall time is about half of it, plus the workers' start.

    python experiments/profile_sweep_steps.py experiments/configs/hora_truths.toml
    python experiments/profile_sweep_steps.py CONFIG --series shared_h4 --json out.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from hmoe_sim.estimators import _core, _lm  # noqa: E402
from hmoe_sim.sweep import cell as cell_module  # noqa: E402
from hmoe_sim.sweep.cells import plan_cells  # noqa: E402
from hmoe_sim.sweep.config import load_config  # noqa: E402

SECONDS: collections.Counter[str] = collections.Counter()
STEPS: list[tuple[object, list[int], float]] = []   # (the solver's output, active rows, seconds)


def _timed(function: Callable, key: str) -> Callable:
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SECONDS[key] += time.perf_counter() - start
    return wrapper


def _install_timers() -> None:
    iterate = _lm._iterate

    def timed_iterate(act, out, *args):
        rows = act.rows.tolist()
        start = time.perf_counter()
        result = iterate(act, out, *args)
        STEPS.append((out, rows, time.perf_counter() - start))
        return result

    _lm._iterate = timed_iterate
    _core.Problem.linearize = _timed(_core.Problem.linearize, "linearize")
    _core.Linearization.normal_equations = _timed(_core.Linearization.normal_equations, "normal_equations")
    _core.factor_gram = _timed(_core.factor_gram, "factor_gram")
    cell_module.fit_batch = _timed(cell_module.fit_batch, "fit_batch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a sweep configuration (TOML)")
    ap.add_argument("--series", action="append", help="only these series (repeatable; default: all)")
    ap.add_argument("--json", metavar="PATH", help="also write the totals and the per-cell times as JSON")
    args = ap.parse_args()
    config = load_config(args.config)
    config_dict = config.to_dict()
    cells = [c for c in plan_cells(config) if not args.series or c.series in args.series]
    if not cells:
        raise SystemExit(f"no cell of {args.config} belongs to the series {args.series}")
    _install_timers()
    by_step: collections.Counter[str] = collections.Counter()
    per_cell = []
    for c in cells:
        STEPS.clear()
        fit_before = SECONDS["fit_batch"]
        start = time.perf_counter()
        cell_module.run_cell(config_dict, c)
        wall = time.perf_counter() - start
        cap = config.series_named(c.series).fit.max_iter
        for out, rows, seconds in STEPS:
            capped = sum(int(out.n_iter[r]) >= cap for r in rows)
            by_step["all steps"] += seconds
            by_step["steps of 1-2 problems"] += seconds * (len(rows) <= 2)
            by_step["steps of 1-4 problems"] += seconds * (len(rows) <= 4)
            by_step["steps with a fit that ends at the cap"] += seconds * (capped > 0)
            by_step["steps of fits that all end at the cap"] += seconds * (capped == len(rows))
        per_cell.append({"truth": c.truth, "series": c.series, "control": c.control, "n": c.n, "wall_s": wall,
                         "fit_s": SECONDS["fit_batch"] - fit_before, "steps": len(STEPS)})
    total = sum(row["wall_s"] for row in per_cell)
    steps = by_step["all steps"]
    print(f"{len(cells)} cells of {args.config} in one process, {config.threads} torch thread(s) each: {total:.1f} s "
          f"(fit_batch {SECONDS['fit_batch']:.1f} s; LM iterations {steps:.1f} s)")
    print("LM iterations by what they do:")
    rest = steps - SECONDS["linearize"] - SECONDS["normal_equations"]
    for label, seconds in [("linearisation", SECONDS["linearize"]), ("normal equations", SECONDS["normal_equations"]),
                           ("  of which the factor Gram", SECONDS["factor_gram"]), ("bookkeeping (the rest)", rest)]:
        print(f"  {label:34s} {seconds:7.1f} s  {seconds / total:5.1%} of the cells' time")
    print("LM iterations by the stack they run on:")
    for label, seconds in by_step.items():
        if label != "all steps":
            print(f"  {label:40s} {seconds:7.1f} s  {seconds / total:5.1%}")
    by_series: collections.Counter[str] = collections.Counter()
    for row in per_cell:
        by_series[f"{row['series']}{' (' + row['control'] + ')' if row['control'] else ''}"] += row["wall_s"]
    print("cells by series:")
    for label, seconds in by_series.most_common():
        print(f"  {label:34s} {seconds:7.1f} s  {seconds / total:5.1%}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cells_s": total, "seconds": dict(SECONDS), "by_step": dict(by_step), "cells": per_cell},
                      fh, indent=1)


if __name__ == "__main__":
    main()
