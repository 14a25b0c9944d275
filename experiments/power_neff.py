"""Power of the n/σ² (effective sample size) headline design, before it runs.

Reads the per-fit spread of log D1 from a pilot (default: the cells of
``experiments/configs/neff_pilot.toml`` that finished before the pilot was stopped -- truth 101,
which is not a headline truth, at n = 1e4, one series per noise level, 4 replications; kept as
``experiments/results/power/neff_pilot_losses.parquet``), takes the median over noise levels of the
standard deviation of log D1 per structure, and prints and writes the expected half-width of a
per-truth slope CI and of the ensemble slope CI on the n_eff axis, with the power to tell a rate
of -1/2 from no decay, for candidate designs. Each design is a set of sample sizes crossed with a
noise ladder; its axis values are n/σ² of every (n, σ) point, over the whole axis and over its
upper half in log scale (the range of the upper-range slope). Pure arithmetic on committed data.

Usage::

    python experiments/power_neff.py      # writes experiments/results/power/power_neff.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from hmoe_sim.power import design_table

ROOT = Path(__file__).resolve().parent.parent


def ladder(sizes: list[float], sigma0: float, steps: int) -> np.ndarray:
    """n/σ² of every (n, σ) point: sizes crossed with σ = sigma0 · 10^(-k/2), k = 0..steps-1."""
    sigmas = sigma0 * 10.0 ** (-np.arange(steps) / 2)
    return np.array([n / s**2 for n in sizes for s in sigmas])


def upper_half(n_eff: np.ndarray) -> np.ndarray:
    """The points in the upper half of the axis in log scale (log n_eff >= the log range's midpoint)."""
    x = np.log(n_eff)
    return n_eff[x >= (x.min() + x.max()) / 2]


#: candidate designs: name -> (sizes, σ0, noise steps, replications); the first is hora_neff.toml's
DESIGNS = {
    "n 1e3,1e4; 5 sigma (4e5..4e10); 6 reps": ([1000, 10_000], 0.05, 5, 6),
    "n 1e3,1e4; 5 sigma; 4 reps": ([1000, 10_000], 0.05, 5, 4),
    "n 1e3,1e4; 6 sigma (4e5..4e11); 6 reps": ([1000, 10_000], 0.05, 6, 6),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pilot", type=Path, default=ROOT / "experiments/results/power/neff_pilot_losses.parquet")
    parser.add_argument("--truths", type=int, default=8, help="truths pooled in the ensemble slope (default 8)")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/power/power_neff.csv")
    args = parser.parse_args(argv)
    pilot = pd.read_parquet(args.pilot)
    noisy = pilot[(pilot["control"].fillna("") == "") & np.isfinite(pilot["D1"]) & (pilot["D1"] > 0)]
    # a cell is one (series, truth, n) of the pilot (one series per noise level there), and one noise level of
    # a run with a noise ladder (``noise_std`` column), so that --pilot also takes a finished ladder run
    cell = ["structure", "series", "truth", "n"] + (["noise_std"] if "noise_std" in noisy else [])
    cell_sd = noisy.assign(log=np.log(noisy["D1"])).groupby(cell)["log"].std()
    spread = cell_sd.groupby("structure").median()
    print(f"pilot: {len(noisy)} noisy fits, {cell_sd.size} cells; median per-cell SD of log D1:")
    print(spread.round(3).to_string())
    tables = []
    for part, pick in (("whole axis", lambda v: v), ("upper half", upper_half)):
        designs = {name: (pick(ladder(sizes, s0, k)), reps) for name, (sizes, s0, k, reps) in DESIGNS.items()}
        table = design_table(designs, spread.to_dict(), truths=args.truths)
        tables.append(table.assign(range=part))
    table = pd.concat(tables, ignore_index=True).rename(columns={"n_sizes": "n_points"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    shown = table[["range", "design", "sd_label", "sd", "n_points", "decades", "slope_halfwidth", "power_per_truth",
                   "ensemble_halfwidth", "power_ensemble"]].copy()
    for c in ("sd", "decades", "slope_halfwidth", "power_per_truth", "ensemble_halfwidth", "power_ensemble"):
        shown[c] = shown[c].map(lambda v: f"{v:.2f}")
    print(shown.to_string(index=False))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
