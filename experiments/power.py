"""Power of the headline design before it runs (issue 22): CI half-widths for -1/2 against 0.

Reads the per-fit spread of log D1 from a committed run (default: the losses of the truth
ensemble of 2026-11 -- near-truth starts only, n = 316..3107 -- kept as
experiments/results/power/hora_truths_2026-11_losses.parquet after its rerun replaced it),
takes the median over (truth, size) cells of the
standard deviation of log D1 per structure and H, and prints and writes the expected half-width
of a per-truth slope CI, of the ensemble slope CI (truths pooled) and of the paired
largest-n difference, for candidate designs. Pure arithmetic on committed data: seconds.

Usage::

    python experiments/power.py            # writes experiments/results/power/power.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from hmoe_sim.power import design_table, difference_halfwidth

ROOT = Path(__file__).resolve().parent.parent

#: candidate designs: name -> (sizes, replications); the first is the one committed in hora_truths.toml
DESIGNS = {
    "decade, 5 sizes, 6 reps": (np.geomspace(1000, 10_000, 5).round(), 6),
    "decade, 5 sizes, 20 reps": (np.geomspace(1000, 10_000, 5).round(), 20),
    "two decades, 5 sizes, 20 reps (GPU)": (np.geomspace(1000, 100_000, 5).round(), 20),
}


def cell_spread(results: pd.DataFrame, loss: str = "D1") -> pd.Series:
    """Median over (truth, n) cells of the SD of log ``loss`` over the noisy fits, per series."""
    noisy = results[results["control"].fillna("") == ""]
    noisy = noisy[np.isfinite(noisy[loss]) & (noisy[loss] > 0)]
    sd = noisy.assign(log=np.log(noisy[loss])).groupby(["series", "truth", "n"])["log"].std()
    return sd.groupby("series").median()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path,
                        default=ROOT / "experiments/results/power/hora_truths_2026-11_losses.parquet",
                        help="a results.parquet (or its truth, series, control, n, replication and loss columns)")
    parser.add_argument("--truths", type=int, nargs=2, default=(8, 4), metavar=("H2", "H4"),
                        help="truths pooled in the ensemble slope at H = 2 and H = 4 (default 8 4)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/power/power.csv")
    args = parser.parse_args(argv)
    results = pd.read_parquet(args.results)
    spread = cell_spread(results)
    print(f"median per-cell SD of log D1 ({args.results}):")
    print(spread.round(3).to_string())
    table = pd.concat([design_table(DESIGNS, {k: v for k, v in spread.items() if k.endswith(h)}, truths=t)
                       for h, t in zip(("h2", "h4"), args.truths, strict=True)], ignore_index=True)
    table["truths"] = [args.truths[0] if label.endswith("h2") else args.truths[1] for label in table["sd_label"]]
    pairs = {h: (spread.get(f"shared_{h}"), spread.get(f"nonshared_{h}")) for h in ("h2", "h4")}
    table["paired_diff_halfwidth"] = [
        difference_halfwidth(row.replications, *pairs[row.sd_label.split("_")[-1]])
        if all(v is not None for v in pairs.get(row.sd_label.split("_")[-1], (None, None))) else np.nan
        for row in table.itertuples()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    shown = table.copy()
    for c in ("sd", "decades", "slope_halfwidth", "power_per_truth", "ensemble_halfwidth", "power_ensemble",
              "paired_diff_halfwidth"):
        shown[c] = shown[c].map(lambda v: f"{v:.2f}")
    print(shown.to_string(index=False))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
