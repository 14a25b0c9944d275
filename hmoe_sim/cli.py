"""Command-line interface ``hmoe-sim``."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from hmoe_sim import __version__
from hmoe_sim.data import sample
from hmoe_sim.models.presets import PRESETS, make_preset

__all__ = ["main", "build_parser", "DESCRIPTION"]

DESCRIPTION = """\
hmoe-sim: simulation checks of the HoRA theory, which reads multi-head LoRA as a hierarchical
mixture of experts. `sweep` fits over-specified mixture models to simulated data at a range of
sample sizes, many replications per size, and estimates the convergence rate of each parameter
loss (Voronoi losses D1, D2 and the L2 error) as the slope of log loss on log n; `report` and
`plot` read a finished run directory; `demo` samples from a model preset."""

EPILOG = """\
Configuration reference (every key with its type, default and meaning):
experiments/configs/README.md. Exit status: 0 success, 2 bad input or a failed check (one line
on stderr; --debug adds the traceback), 1 lost workers or dask scheduler (one line) or an
unexpected error, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM); an interrupted or
stopped sweep keeps its finished cells and resumes when rerun."""


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
    """Draw the run's figure and write it to ``target`` (default ``DIR/<name>.png``) through a temporary file
    (:func:`hmoe_sim.files.atomic_write`: never through a symbolic link); the format follows the suffix.

    A run with a noise ladder (``summary.csv`` has ``n_eff``) is drawn on n/sigma^2: a single truth
    as loss against n/sigma^2, a truth ensemble as the forest of upper-half slopes on n/sigma^2,
    with the loss against n/sigma^2 per truth beside it in ``<stem>_losses.<suffix>``.
    """
    from hmoe_sim.files import atomic_write
    from hmoe_sim.plotting import close_figure, plot_forest, plot_neff_panels, plot_rate_panels
    from hmoe_sim.sweep import RunDir
    from hmoe_sim.sweep.report import loss_columns, summary_table
    from hmoe_sim.sweep.storage import ENSEMBLE_FILE, PER_TRUTH_FILE, SUMMARY_FILE

    run = RunDir(run_dir)
    config, results = run.read_checked(notify=_note)
    fingerprint = run.stored_fingerprint()
    rates = run.read_rates(fingerprint, _note)
    run.check_table(SUMMARY_FILE, fingerprint, _note)
    target = run.figure_path(config.name) if target is None else target
    image_format = target.suffix.lstrip(".").lower() or "png"
    summary = summary_table(results, config)
    ladder = "n_eff" in summary
    structures = {s.name: s.structure for s in config.series if s.structure}
    per_truth = run.path / PER_TRUTH_FILE
    if len(config.truth_seeds) > 1 and per_truth.is_file():
        run.check_table(PER_TRUTH_FILE, fingerprint, _note)
        title = (f"{config.name}: {len(config.truth_seeds)} truths of {config.truth.preset}, "
                 f"{config.replications} replications per " + ("(n, σ)" if ladder else "n"))
        table = pd.read_csv(per_truth).drop(columns=["fingerprint"], errors="ignore")
        ensemble = None
        if (run.path / ENSEMBLE_FILE).is_file():
            run.check_table(ENSEMBLE_FILE, fingerprint, _note)
            ensemble = pd.read_csv(run.path / ENSEMBLE_FILE)
        fig = plot_forest(table, [c for c in ("D1", "L2") if c in loss_columns(config)], title=title,
                          ensemble=ensemble, upper=ladder, axis="n_eff" if ladder else "n")
        if ladder:
            losses = plot_neff_panels(summary, rates, [c for c in ("D1", "L2") if c in loss_columns(config)],
                                      structures=structures, title=title)
            atomic_write(target.with_name(f"{target.stem}_losses{target.suffix}"),
                         lambda f: losses.savefig(f, format=image_format, dpi=110))
            close_figure(losses)
    elif ladder:
        title = (f"{config.name}: {config.truth.preset}, {config.replications} replications per (n, σ); "
                 "loss against n/σ²")
        fig = plot_neff_panels(summary, rates, loss_columns(config), structures=structures, title=title)
    else:
        title = f"{config.name}: {config.truth.preset}, {config.replications} replications per n"
        fig = plot_rate_panels(summary, rates, loss_columns(config), title=title, structures=structures)
    try:
        if image_format not in fig.canvas.get_supported_filetypes():
            raise ValueError(f"figure {str(target)!r}: unknown image format {image_format!r}; use one of "
                             f"{sorted(fig.canvas.get_supported_filetypes())}")
        atomic_write(target, lambda f: fig.savefig(f, format=image_format, dpi=110))
    finally:
        close_figure(fig)
    return target


def _check_dir(path: str) -> None:
    """Refuse an empty run directory argument (it would silently mean the current directory)."""
    if not path.strip():
        raise ValueError(f"DIR {path!r} is empty; give a run directory (use . for the current directory)")


def _note(message: str) -> None:
    """A one-line notice on stderr."""
    print(f"hmoe-sim: {message}", file=sys.stderr)


def _report_text(rates: pd.DataFrame, summary: pd.DataFrame, boundary: pd.DataFrame) -> str:
    from hmoe_sim.sweep.report import format_boundary, format_rates

    if "control" in summary:
        summary = summary[summary["control"].fillna("") == ""]
    if "n_at_max_iter" not in summary:  # a summary.csv written before the column existed
        summary = summary.assign(n_at_max_iter=0)
    counts = summary.groupby("series", sort=False)[["n_fits", "n_flagged", "n_on_boundary", "n_worse_than_truth",
                                                    "n_at_max_iter"]].sum()
    on_neff = "axis" in rates and bool((rates["axis"] == "n_eff").any())
    lines = ["rates (slope of log loss on log n, bootstrap CI; flagged fits excluded from the main slope; "
             "sensitivity: slope_all over every fit of finite loss, *_inside over fits strictly inside the box"
             + ("; axis n_eff: on log n/sigma^2 over every (n, sigma), the n rows at the largest sigma, "
                "equivalence_diff: the worst matched pair of sizes at equal n/sigma^2" if on_neff else "") + "):",
             format_rates(rates), "",
             "fits per series: " + ", ".join(
                 f"{s}: {int(r.n_fits)} ({int(r.n_flagged)} flagged: diverged or on the boundary at an excluded "
                 f"kind; {int(r.n_on_boundary)} on the boundary at any kind; {int(r.n_worse_than_truth)} with "
                 f"empirical risk above the truth's; {int(r.n_at_max_iter)} stopped at max_iter, not converged)"
                 for s, r in counts.iterrows()),
             format_boundary(boundary)]
    return "\n".join(lines)


def _cmd_plot(args: argparse.Namespace) -> int:
    """Redraw a sweep's figure from its tables."""
    _check_dir(args.dir)
    figure = _write_figure(Path(args.dir), None if args.output is None else Path(args.output))
    print(f"figure: {figure}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    """Recompute rates.csv, summary.csv and boundary.csv from results.parquet and print them.

    The tables are rewritten when the directory is writable; a read-only directory is only
    read (a notice on stderr says the files were left as they are).
    """
    from hmoe_sim.sweep import RunDir
    from hmoe_sim.sweep.storage import BOUNDARY_FILE, RATES_FILE, SUMMARY_FILE
    from hmoe_sim.sweep.tables import derived_tables

    _check_dir(args.dir)
    run = RunDir(args.dir)
    config, results = run.read_checked(notify=_note)
    fingerprint = run.stored_fingerprint()
    tables = derived_tables(results, config)
    rates, summary, boundary = tables[RATES_FILE], tables[SUMMARY_FILE], tables[BOUNDARY_FILE]
    if run.writable():
        try:
            for name, table in tables.items():
                run.write_table(name, table, fingerprint)
        except OSError as err:
            print(f"hmoe-sim: note: tables not rewritten ({err.strerror or err}); printing only", file=sys.stderr)
    else:
        print(f"hmoe-sim: note: {str(run.path)!r} is read-only; tables not rewritten, printing only",
              file=sys.stderr)
    print(f"{config.name} ({len(results)} fits, fingerprint {run.stored_fingerprint()})")
    print(_report_text(rates, summary, boundary))
    return 0


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, print the full traceback as well as the one-line message")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``hmoe-sim``."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="hmoe-sim", description=DESCRIPTION, epilog=EPILOG, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the package version and exit")
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="sample data from a preset and print a summary",
                          description="Sample data from a model preset and print a summary of the truth and the data.")
    demo.add_argument("--preset", default="hmoe-shared", choices=sorted(PRESETS),
                      help="model preset to sample from (default hmoe-shared)")
    demo.add_argument("--n", type=int, default=1000, help="sample size (default 1000)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the truth and of the data (default 0)")
    _add_debug(demo, argparse.SUPPRESS)
    demo.set_defaults(func=_cmd_demo)

    sweep = sub.add_parser(
        "sweep", help="run (or resume) a convergence-rate sweep from a TOML config",
        description="Run or resume a convergence-rate sweep. Every check runs before any work; the run directory "
                    "is locked while the sweep runs; finished cells are verified and reused, so a stopped sweep "
                    "resumes when the same command is run again.",
        epilog="Configuration reference: experiments/configs/README.md.")
    sweep.add_argument("config", help="TOML configuration file (examples in experiments/configs/)")
    sweep.add_argument("--out", required=True,
                       help="run directory: created if missing; verified cells found there are reused")
    sweep.add_argument("--device", default=None, help="cpu, cuda or cuda:<i> (overrides the config's device)")
    sweep.add_argument("--jobs", type=int, default=1,
                       help="cells computed in parallel: worker processes, or dask workers (default 1); at most the "
                            "usable cores over the config's threads, lowered with a notice")
    sweep.add_argument("--backend", choices=("local", "dask"), default="local",
                       help="local: in-process or a process pool (default); dask: a dask.distributed cluster")
    sweep.add_argument("--scheduler", default=None,
                       help="address of a running dask scheduler, e.g. tcp://host:8786 (with --backend dask; "
                            "default: start a local cluster)")
    sweep.add_argument("--no-progress", action="store_true",
                       help="no progress output (default: a bar on a terminal, else a plain line at most every 30 s)")
    _add_debug(sweep, argparse.SUPPRESS)
    sweep.set_defaults(func=_cmd_sweep)

    plot = sub.add_parser("plot", help="draw a sweep's log-log figure (DIR/<name>.png)",
                          description="Redraw a finished sweep's figure from its tables.")
    plot.add_argument("dir", help="run directory written by `hmoe-sim sweep`")
    plot.add_argument("--output", default=None, help="PNG path (default DIR/<config name>.png)")
    _add_debug(plot, argparse.SUPPRESS)
    plot.set_defaults(func=_cmd_plot)

    report = sub.add_parser("report", help="recompute and print a sweep's rates table",
                            description="Recompute rates.csv, summary.csv and boundary.csv from results.parquet "
                                        "and print them (a read-only directory is only read).")
    report.add_argument("dir", help="run directory written by `hmoe-sim sweep`")
    _add_debug(report, argparse.SUPPRESS)
    report.set_defaults(func=_cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status.

    Errors are one line on stderr (``hmoe-sim: error: ...``) with exit status 2 for bad input
    and failed checks (``ValueError``, ``OSError``), 1 for anything unexpected; ``--debug``
    adds the traceback. Ctrl-C ends with 130, SIGTERM during a sweep with 143.
    """
    from hmoe_sim.sweep.runner import SweepAborted, SweepInterrupted

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        return int(args.func(args))
    except SweepInterrupted as err:
        print(f"hmoe-sim: {err}", file=sys.stderr)
        return 128 + int(err.signal_number)
    except SweepAborted as err:  # lost workers or scheduler: what happened, not an internal error
        if debug:
            traceback.print_exc()
        print(f"hmoe-sim: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("hmoe-sim: interrupted", file=sys.stderr)
        return 128 + int(signal.SIGINT)
    except BrokenPipeError:  # output piped into e.g. `head`, which has exited: stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError) as err:
        if debug:
            traceback.print_exc()
        print(f"hmoe-sim: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # the last line of defence: one line, the traceback with --debug
        if debug:
            traceback.print_exc()
        print(f"hmoe-sim: internal error: {type(err).__name__}: {_one_line(err)} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (an OSError with its file name)."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.strerror}: {err.filename!r}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    raise SystemExit(main())
