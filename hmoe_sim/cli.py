"""Command-line interface ``hmoe-sim``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
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


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Run or resume a sweep, then write its tables and figure."""
    from hmoe_sim.sweep import load_config, run_sweep
    from hmoe_sim.sweep.report import boundary_table

    config = load_config(args.config)
    outcome = run_sweep(config, args.out, device=args.device, jobs=args.jobs, backend=args.backend,
                        scheduler=args.scheduler, progress=False if args.no_progress else None)
    figure = _write_figure(Path(args.out))
    print(f"{outcome.n_cells} cells ({outcome.reused} reused, {outcome.computed} computed) in "
          f"{outcome.seconds:.1f} s; {len(outcome.results)} fits -> {Path(args.out) / 'results.parquet'}")
    print(_report_text(outcome.rates, outcome.summary, boundary_table(outcome.results)))
    print(f"figure: {figure}")
    return 0


def _write_figure(run_dir: Path, target: Path | None = None) -> Path:
    from hmoe_sim.plotting import plot_forest, plot_rate_panels
    from hmoe_sim.sweep import RunDir
    from hmoe_sim.sweep.report import loss_columns, summary_table
    from hmoe_sim.sweep.storage import PER_TRUTH_FILE

    run = RunDir(run_dir)
    config = run.read_config()
    target = run_dir / f"{config.name}.png" if target is None else target
    per_truth = run.path / PER_TRUTH_FILE
    if len(config.truth_seeds) > 1 and per_truth.is_file():
        title = (f"{config.name}: {len(config.truth_seeds)} truths of {config.data['truth']['preset']}, "
                 f"{config.replications} replications per n")
        fig = plot_forest(pd.read_csv(per_truth), [c for c in ("D1", "L2") if c in loss_columns(config)], title=title)
    else:
        summary = summary_table(run.read_results(), config)
        title = f"{config.name}: {config.data['truth']['preset']}, {config.replications} replications per n"
        fig = plot_rate_panels(summary, run.read_rates(), loss_columns(config), title=title)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    return target


def _report_text(rates: pd.DataFrame, summary: pd.DataFrame, boundary: pd.DataFrame) -> str:
    from hmoe_sim.sweep.report import format_boundary, format_rates

    if "control" in summary:
        summary = summary[summary["control"].fillna("") == ""]
    counts = summary.groupby("series", sort=False)[["n_fits", "n_flagged", "n_on_boundary", "n_worse_than_truth"]
                                                   ].sum()
    lines = ["rates (slope of log loss on log n, bootstrap CI; flagged fits excluded from the main slope; "
             "sensitivity: slope_all over every fit of finite loss, *_inside over fits strictly inside the box):",
             format_rates(rates), "",
             "fits per series: " + ", ".join(
                 f"{s}: {int(r.n_fits)} ({int(r.n_flagged)} flagged: diverged or on the boundary at an excluded "
                 f"kind; {int(r.n_on_boundary)} on the boundary at any kind; {int(r.n_worse_than_truth)} with "
                 "empirical risk above the truth's)" for s, r in counts.iterrows()),
             format_boundary(boundary)]
    return "\n".join(lines)


def _cmd_plot(args: argparse.Namespace) -> int:
    """Redraw a sweep's figure from its tables."""
    figure = _write_figure(Path(args.dir), None if args.output is None else Path(args.output))
    print(f"figure: {figure}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """Recompute rates.csv and summary.csv from results.parquet and print them."""
    from hmoe_sim.sweep import RunDir
    from hmoe_sim.sweep.report import boundary_table, rates_table, summary_table
    from hmoe_sim.sweep.storage import BOUNDARY_FILE, RATES_FILE, SUMMARY_FILE

    run = RunDir(args.dir)
    config = run.read_config()
    results = run.read_results()
    rates, summary = rates_table(results, config), summary_table(results, config)
    run.write_table(RATES_FILE, rates)
    run.write_table(SUMMARY_FILE, summary)
    boundary = boundary_table(results)
    run.write_table(BOUNDARY_FILE, boundary)
    print(f"{config.name} ({len(results)} fits, fingerprint {config.fingerprint})")
    print(_report_text(rates, summary, boundary))
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

    sweep = sub.add_parser("sweep", help="run (or resume) a convergence-rate sweep from a TOML config")
    sweep.add_argument("config", help="TOML configuration (see experiments/configs/)")
    sweep.add_argument("--out", required=True, help="run directory (cells found there are reused)")
    sweep.add_argument("--device", default=None, help="cpu, cuda or cuda:<i> (overrides the config)")
    sweep.add_argument("--jobs", type=int, default=1, help="cells run in parallel (default 1)")
    sweep.add_argument("--backend", choices=("local", "dask"), default="local",
                       help="joblib in-process/loky (local) or a dask.distributed cluster")
    sweep.add_argument("--scheduler", default=None, help="address of a running dask scheduler (with --backend dask)")
    sweep.add_argument("--no-progress", action="store_true", help="no progress bar")
    sweep.set_defaults(func=_cmd_sweep)

    plot = sub.add_parser("plot", help="draw a sweep's log-log figure (DIR/<name>.png)")
    plot.add_argument("dir", help="run directory written by `hmoe-sim sweep`")
    plot.add_argument("--output", default=None, help="PNG path (default DIR/<config name>.png)")
    plot.set_defaults(func=_cmd_plot)

    report = sub.add_parser("report", help="recompute and print a sweep's rates table")
    report.add_argument("dir", help="run directory written by `hmoe-sim sweep`")
    report.set_defaults(func=_cmd_report)
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
