"""Command-line interface ``hmoe-sim``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from hmoe_sim.data import sample
from hmoe_sim.models.presets import PRESETS, make_preset

__all__ = ["main", "build_parser"]


def _cmd_demo(args: argparse.Namespace) -> int:
    """Sample data from a preset and print a summary."""
    setup = make_preset(args.preset, seed=args.seed)
    X, y = sample(setup.true_model, setup.truth, args.n, setup.noise_std, args.seed)
    f = setup.true_model.predict(setup.truth, X)
    measure = setup.true_model.mixing_measure(setup.truth)
    print(f"preset       {setup.name}: {PRESETS[setup.name][2]}")
    print(f"true model   {setup.true_model}")
    print(f"fitted model {setup.fit_model} ({setup.fit_model.n_params} free parameters)")
    print(f"true atoms   {measure.atoms.shape[-2]} in R^{measure.atoms.shape[-1]}, "
          f"weights {[round(w, 4) for w in measure.weights.tolist()]}")
    print(f"data         n={args.n}, X in [{X.min():.3f}, {X.max():.3f}]^{X.shape[1]}, "
          f"Var f*(X)={f.var():.4f}, noise std {setup.noise_std}, "
          f"empirical noise std {torch.std(y - f):.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hmoe-sim``."""
    parser = argparse.ArgumentParser(prog="hmoe-sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sample data from a preset and print a summary")
    demo.add_argument("--preset", default="hmoe-shared", choices=sorted(PRESETS))
    demo.add_argument("--n", type=int, default=1000)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as err:
        print(f"hmoe-sim: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
