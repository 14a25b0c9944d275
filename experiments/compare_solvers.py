"""Compare two runs of one sweep configuration fit by fit (e.g. the old and the new LM).

    python experiments/compare_solvers.py OLD_RUN_DIR NEW_RUN_DIR [--fraction 0.01] [--csv OUT.csv]

Reads ``results.parquet`` of both, matches the kept fits (same truth, series, control, n,
replication: the same data and starts) and reports per series how many kept fits' risks moved beyond
``fraction`` of the near-optimal margin ``(2 * 0.5 / n) * risk``, in which direction, and the
converged shares and mean iterations of both (``hmoe_sim.sweep.compare``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from hmoe_sim.sweep.compare import compare_fits


def _margin_of(run: Path) -> float:
    """``fit.near_optimal_loglik`` of a run's resolved configuration (0.5 when it does not say)."""
    resolved = run / "config.resolved.json"
    if not resolved.exists():
        return 0.5
    return float(json.loads(resolved.read_text()).get("fit", {}).get("near_optimal_loglik", 0.5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", type=Path, help="run directory (or results.parquet) of the reference run")
    ap.add_argument("new", type=Path, help="run directory (or results.parquet) of the run to check")
    ap.add_argument("--fraction", type=float, default=0.01, help="fraction of the margin that counts as moved")
    ap.add_argument("--csv", type=Path, help="also write the table as CSV")
    args = ap.parse_args()
    frames = []
    for path in (args.old, args.new):
        file = path / "results.parquet" if path.is_dir() else path
        if not file.exists():
            raise SystemExit(f"no results.parquet at {path}")
        frames.append(pd.read_parquet(file))
    margin = _margin_of(args.old) if args.old.is_dir() else 0.5
    table = compare_fits(*frames, fraction=args.fraction, loglik_margin=margin)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"kept fits of {args.new} against {args.old}: moved beyond {args.fraction:g} of the margin "
              f"(2 * {margin:g} / n) * risk")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.csv:
        table.to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
