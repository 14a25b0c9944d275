"""Sample complexity n*(eps) = sigma^2 z / ||f_eps - f*||^2 along the theory's sequences, and its exponents.

Writes experiments/results/sample_complexity/{sample_complexity.csv, exponents.csv} and
figures/sample_complexity.png.
Usage: python experiments/sample_complexity.py [--n-eval 20000] [--seed 0] [--truth-seed 0]
       [--level 0.05] [--power 0.95] [--window 5]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hmoe_sim.plotting import plot_sample_complexity
from hmoe_sim.sample_complexity import exponent_table, sample_complexity_table, two_point_z
from hmoe_sim.theory_checks import DEFAULT_EPS

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-eval", type=int, default=20_000, help="evaluation sample size")
    parser.add_argument("--seed", type=int, default=0, help="evaluation sample seed")
    parser.add_argument("--truth-seed", type=int, default=0, help="preset truth seed")
    parser.add_argument("--level", type=float, default=0.05, help="type-I error of the two-point test")
    parser.add_argument("--power", type=float, default=0.95, help="power of the two-point test")
    parser.add_argument("--window", type=int, default=5, help="eps grid points per local-exponent window")
    parser.add_argument("--out", type=Path, default=ROOT / "experiments/results/sample_complexity")
    parser.add_argument("--figure", type=Path, default=ROOT / "figures/sample_complexity.png")
    args = parser.parse_args(argv)
    table = sample_complexity_table(eps=DEFAULT_EPS, level=args.level, power=args.power, n_eval=args.n_eval,
                                    seed=args.seed, truth_seed=args.truth_seed, window=args.window)
    exponents = exponent_table(table, window=args.window)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "sample_complexity.csv", index=False, float_format="%.6e")
    exponents.to_csv(args.out / "exponents.csv", index=False, float_format="%.6g")
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    plot_sample_complexity(table).savefig(args.figure, dpi=130)
    print(f"z = (z_(1-{args.level:g}) + z_({args.power:g}))^2 = {two_point_z(args.level, args.power):.4f}, "
          f"sigma = preset noise_std; exponent p of n* ~ x^-p (local: windows of {args.window} eps points)")
    shown = exponents.assign(
        large=[f"{v:.2f}" if ok else "n*=inf" for v, ok in zip(exponents.exponent_large_eps, exponents.n_star_finite,
                                                               strict=True)],
        small=[f"{v:.2f}" if ok else "n*=inf" for v, ok in zip(exponents.exponent_small_eps, exponents.n_star_finite,
                                                               strict=True)])
    wide = shown.pivot(index=["model", "sequence"], columns="against", values=["large", "small"])
    print("exponents at eps 1e-1..1e-2 (large) and 1e-6..1e-7 (small); '-': loss not defined for the sequence")
    print(wide.loc[list(dict.fromkeys(zip(exponents.model, exponents.sequence, strict=True)))].fillna("-").to_string())
    print(f"wrote {args.out}/sample_complexity.csv, {args.out}/exponents.csv and {args.figure}")


if __name__ == "__main__":
    main()
