"""Numerical check of the inverse bound: rho(eps) = ||f_eps - f*||_L2 / D(G_eps, G*) for all models.

Writes experiments/results/inverse_bound/inverse_bound.csv and figures/inverse_bound.png.
Usage: python experiments/inverse_bound.py [--n-eval 20000] [--seed 0] [--truth-seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hmoe_sim.plotting import plot_inverse_bound
from hmoe_sim.theory_checks import DEFAULT_EPS, inverse_bound_table

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-eval", type=int, default=20_000, help="evaluation sample size")
    parser.add_argument("--seed", type=int, default=0, help="evaluation sample seed")
    parser.add_argument("--truth-seed", type=int, default=0, help="preset truth seed")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/inverse_bound/inverse_bound.csv")
    parser.add_argument("--figure", type=Path, default=ROOT / "figures/inverse_bound.png")
    args = parser.parse_args(argv)
    table = inverse_bound_table(eps=DEFAULT_EPS, n_eval=args.n_eval, seed=args.seed, truth_seed=args.truth_seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False, float_format="%.6e")
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    plot_inverse_bound(table).savefig(args.figure, dpi=130)
    ends = table[np.isclose(table.eps, 1e-1) | np.isclose(table.eps, 1e-6)]
    print(ends.pivot_table(index=["model", "loss", "r"], columns="eps", values="rho").to_string(float_format="%.3e"))
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
