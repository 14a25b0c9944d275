"""Markdown tables of a truth-ensemble run, as quoted in the README and paper_notes/05 (issue 22).

Reads ``per_truth.csv``, ``ensemble.csv`` and ``summary.csv`` of a finished run directory (written by
``hmoe-sim sweep`` / ``hmoe-sim report``) and prints: per truth and loss, each structure's slope
with its CI and verdict, the paired largest-n difference of log loss with its CI; per (H, loss), the
ensemble comparisons; and the verdict counts. Pure reading and formatting: seconds. ``--axis n_eff``
reads the rows on the effective sample size n/sigma^2 of a run with a noise ladder (default ``n``).

Usage::

    python experiments/headline_tables.py experiments/results/hora_truths
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from hmoe_sim.sweep import RunDir
from hmoe_sim.sweep.ensemble import paired_largest_n, structure_pairs

#: columns of the upper-half slope and of the worst matched pair, for :func:`_slope`
UPPER = ("slope_upper", "ci_low_upper", "ci_high_upper")
EQUIVALENCE = ("equivalence_diff", "equivalence_ci_low", "equivalence_ci_high")


def _slope(row: pd.Series, mid: str = "slope", low: str = "ci_low", high: str = "ci_high") -> str:
    """``row[mid] [row[low], row[high]]``, or ``"-"`` where ``row[mid]`` is not finite."""
    return _ci(row[mid], row[low], row[high])


def _on_axis(table: pd.DataFrame, axis: str) -> pd.DataFrame:
    """The rows of ``table`` on ``axis`` (tables written before the column existed are all on n)."""
    if "axis" not in table:
        if axis != "n":
            raise ValueError(f"the table has no axis column (a run without a noise ladder): axis {axis!r} unavailable")
        return table
    return table[table["axis"] == axis]


def _ci(mid: float, low: float, high: float) -> str:
    return "-" if not np.isfinite(mid) else f"{mid:+.2f} [{low:+.2f}, {high:+.2f}]"


def _truth_pairs(run: Path, loss: str, axis: str):
    """Per (H, truth): the shared and non-shared rows of ``per_truth.csv`` on ``axis`` and the paired
    largest-value difference of log loss, formatted (``"-"`` where no data set was fitted by both)."""
    config, results = RunDir(run).read_checked()
    per_truth = _on_axis(pd.read_csv(run / "per_truth.csv"), axis)
    for h, (shared, nonshared) in structure_pairs(config).items():
        part = per_truth[(per_truth["H"] == h) & (per_truth["loss"] == loss)]
        diffs, _ = paired_largest_n(results, shared, nonshared, loss, axis=axis)
        diffs = diffs.set_index("truth")
        for truth in sorted(part["truth"].unique()):
            a = part[(part["truth"] == truth) & (part["series"] == shared)].iloc[0]
            b = part[(part["truth"] == truth) & (part["series"] == nonshared)].iloc[0]
            d = diffs.loc[truth] if truth in diffs.index else None
            yield h, truth, a, b, "-" if d is None else _ci(d["diff"], d["diff_ci_low"], d["diff_ci_high"])


def per_truth_markdown(run: Path, loss: str, axis: str = "n") -> str:
    """Per truth: shared and non-shared slope, verdict, and the paired largest-n difference of log loss."""
    lines = [f"| H | truth | shared {loss} slope | verdict | non-shared {loss} slope | verdict | "
             f"log {loss} shared - non-shared at the largest n [95% CI] |", "|---|---|---|---|---|---|---|"]
    for h, truth, a, b, diff in _truth_pairs(run, loss, axis):
        lines.append(f"| {h} | {truth} | {_slope(a)} | `{a['verdict']}` | {_slope(b)} | `{b['verdict']}` | {diff} |")
    return "\n".join(lines)


def _level(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{value:.2g}"


def per_truth_neff_markdown(run: Path, loss: str) -> str:
    """Per truth on n/sigma^2: the upper-half slopes and verdicts, the paired level at the largest n/sigma^2,
    the worst matched pair of sizes (difference of median log losses at equal n/sigma^2, upper half) and
    the noise-free control (the sigma = 0 end) beside the noisy median at the largest n/sigma^2."""
    lines = [f"| H | truth | shared {loss} upper-half slope | verdict | non-shared {loss} upper-half slope | verdict "
             f"| log {loss} shared - non-shared at the largest n/sigma^2 [95% CI] | worst matched pair shared "
             f"| worst matched pair non-shared | {loss} shared: largest n/sigma^2, control "
             f"| {loss} non-shared: largest n/sigma^2, control |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for h, truth, a, b, diff in _truth_pairs(run, loss, "n_eff"):
        lines.append(f"| {h} | {truth} | {_slope(a, *UPPER)} | `{a['verdict']}` "
                     f"| {_slope(b, *UPPER)} | `{b['verdict']}` "
                     f"| {diff} | {_slope(a, *EQUIVALENCE)} | {_slope(b, *EQUIVALENCE)} "
                     f"| {_level(a['noisy_level'])}, {_level(a['control_level'])} "
                     f"| {_level(b['noisy_level'])}, {_level(b['control_level'])} |")
    return "\n".join(lines)


def ensemble_markdown(run: Path, axis: str = "n") -> str:
    """Per (H, loss): verdict pairs, paired comparisons and the ensemble slopes."""
    ens = _on_axis(pd.read_csv(run / "ensemble.csv"), axis)
    lines = ["| H | loss | truths | verdict pairs (shared/non-shared) | largest-n difference of log loss, "
             "median over truths [95% CI] | shared below | ensemble slope shared | ensemble slope non-shared |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ens.itertuples():
        lines.append(
            f"| {r.H} | {r.loss} | {r.n_truths} | {r.verdict_pairs} | "
            f"{_ci(r.largest_n_diff_median, r.largest_n_diff_ci_low, r.largest_n_diff_ci_high)} "
            f"(n = {r.largest_n:.0f}) | "
            f"{r.n_shared_below} of {r.n_truths} | "
            f"{_ci(r.shared_ensemble_slope, r.shared_ensemble_ci_low, r.shared_ensemble_ci_high)} | "
            f"{_ci(r.nonshared_ensemble_slope, r.nonshared_ensemble_ci_low, r.nonshared_ensemble_ci_high)} |")
    if axis == "n_eff":
        lines += ["", "| H | loss | pooled upper-half slope shared | pooled upper-half slope non-shared "
                      "| shared upper-half CI below non-shared (truths) |", "|---|---|---|---|---|"]
        for r in ens.itertuples():
            shared = _ci(r.shared_ensemble_slope_upper, r.shared_ensemble_ci_low_upper,
                         r.shared_ensemble_ci_high_upper)
            nonshared = _ci(r.nonshared_ensemble_slope_upper, r.nonshared_ensemble_ci_low_upper,
                            r.nonshared_ensemble_ci_high_upper)
            lines.append(
                f"| {r.H} | {r.loss} | {shared} | {nonshared} "
                f"| {r.n_shared_upper_ci_below} of {r.n_truths} |")
    return "\n".join(lines)


def protocol_markdown(run: Path, axis: str = "n") -> str:
    """Per series: fits at the cap, how often the kept start was a random one, the ladder exponents."""
    rates = _on_axis(pd.read_csv(run / "rates.csv"), axis)
    summary = pd.read_csv(run / "summary.csv")
    noisy = summary[summary["control"].fillna("") == ""]
    lines = ["| series | noisy fits | converged | at max_iter | best start random | D1 ladder exponent "
             "(median over truths) | identifiable (D1) | flat directions (D1) |", "|---|---|---|---|---|---|---|---|"]
    def median(values: pd.Series) -> str:
        finite = values.to_numpy(dtype=float)
        finite = finite[np.isfinite(finite)]
        return f"{np.median(finite):.2f}" if finite.size else "- (round-off)"

    for series, part in rates[rates["loss"] == "D1"].groupby("series", sort=False):
        fits = noisy[noisy["series"] == series]
        cap = int(fits["n_at_max_iter"].sum()) if "n_at_max_iter" in fits else 0
        lines.append(
            f"| {series} | {int(fits['n_fits'].sum())} | {int(fits['n_converged'].sum())} | {cap} | "
            f"{part['best_random_fraction'].median():.0%} | {median(part['control_perturb_exponent'])} | "
            f"{', '.join(sorted(set(part['identifiable'].astype(str))))} | "
            f"{', '.join(str(int(v)) for v in sorted(set(part['n_flat'].dropna())))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished truth-ensemble run directory")
    parser.add_argument("--losses", nargs="+", default=["D1", "L2"])
    parser.add_argument("--axis", choices=["n", "n_eff"], default="n", help="rows on n or on n/sigma^2")
    args = parser.parse_args(argv)
    for loss in args.losses:
        print(f"\n### per truth, {loss}\n")
        print(per_truth_markdown(args.run, loss, args.axis))
        if args.axis == "n_eff":
            print(f"\n### per truth on n/sigma^2, upper half, {loss}\n")
            print(per_truth_neff_markdown(args.run, loss))
    print("\n### ensemble\n")
    print(ensemble_markdown(args.run, args.axis))
    print("\n### protocol\n")
    print(protocol_markdown(args.run, args.axis))
    per_truth = _on_axis(pd.read_csv(args.run / "per_truth.csv"), args.axis)
    verdicts = per_truth.groupby(["series", "loss"])["verdict"].value_counts()
    print("\n### verdict counts\n")
    print(verdicts.to_string())


if __name__ == "__main__":
    main()
