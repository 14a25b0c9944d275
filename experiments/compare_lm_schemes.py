"""Fit cells of a sweep configuration with a chosen LM scheme, in one process, and save the kept fits.

    python experiments/compare_lm_schemes.py CONFIG OUT.parquet [--scheme nielsen,plain,max,1e-3]
        [--sizes 1000,3162] [--chunks 0]

The scheme is ``UPDATE,STEP,SCALING,RESOLUTION``: ``nielsen`` or ``delayed``; ``plain`` or ``geo``
(geodesic acceleration); ``max`` (More's scaling) or ``current`` (Marquardt's); the resolution test's
fraction (0: off). It replaces the default scheme for this process only (``_lm_scheme.DEFAULT_SCHEME``),
runs every selected cell with ``run_cell`` one after the other and prints the CPU seconds, the LM
iterations and converged fits over every start, and per series the kept fits' converged share, mean
iterations and share at the cap. Two outputs of the same cells compare with
``experiments/compare_solvers.py OLD.parquet NEW.parquet``. paper_notes/03 ("An LM for sloppy problems")
reports these runs on ``experiments/configs/lm_workload.toml`` (sizes 1000 and 3162, chunk 0).
"""

from __future__ import annotations

import argparse
import collections
import time

import pandas as pd

from hmoe_sim.estimators import _lm_scheme
from hmoe_sim.sweep import cell as cell_module
from hmoe_sim.sweep.cells import plan_cells
from hmoe_sim.sweep.config import load_config


def parse_scheme(text: str) -> _lm_scheme.LMScheme:
    """``UPDATE,STEP,SCALING,RESOLUTION`` as an :class:`LMScheme` (one clear error for a bad value)."""
    parts = text.split(",")
    if len(parts) != 4 or parts[1] not in ("plain", "geo"):
        raise SystemExit(f"--scheme must be UPDATE,plain|geo,SCALING,RESOLUTION, got {text!r}")
    try:
        return _lm_scheme.LMScheme(parts[0], parts[1] == "geo", scaling=parts[2], resolution=float(parts[3]))
    except ValueError as err:
        raise SystemExit(f"--scheme {text!r}: {err}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("out", help="parquet file for the kept fits (run_cell's rows)")
    ap.add_argument("--scheme", default="nielsen,plain,max,1e-3")
    ap.add_argument("--sizes", help="only these n (comma-separated; default: all)")
    ap.add_argument("--chunks", help="only these chunks (comma-separated; default: all)")
    args = ap.parse_args()
    _lm_scheme.DEFAULT_SCHEME = parse_scheme(args.scheme)
    config = load_config(args.config)
    sizes = None if args.sizes is None else {int(v) for v in args.sizes.split(",")}
    chunks = None if args.chunks is None else {int(v) for v in args.chunks.split(",")}
    cells = [c for c in plan_cells(config)
             if (sizes is None or c.n in sizes) and (chunks is None or c.chunk in chunks)]
    if not cells:
        raise SystemExit(f"no cell of {args.config} has n in {sorted(sizes or [])} and chunk in {sorted(chunks or [])}")
    every: collections.Counter[str] = collections.Counter()
    fit_batch = cell_module.fit_batch

    def counted(*a, **k):  # every start's iterations and convergence, not only the kept fit's
        result = fit_batch(*a, **k)
        starts = result.all_starts if result.all_starts is not None else result
        every["fits"] += len(starts)
        every["iterations"] += int(starts.n_iter.sum())
        every["converged"] += int(starts.converged.sum())
        return result

    cell_module.fit_batch = counted
    config_dict = config.to_dict()
    start = time.process_time()
    frame = pd.concat([cell_module.run_cell(config_dict, c) for c in cells], ignore_index=True)
    cpu = time.process_time() - start
    frame.to_parquet(args.out)
    cap = max(config.series_named(s).fit.max_iter for s in frame["series"].unique())
    print(f"{args.scheme}: {len(cells)} cells, {cpu:.1f} CPU s; all starts: {every['fits']} fits, "
          f"{every['iterations']} iterations, {every['converged']} converged")
    by = frame.groupby("series")
    print(pd.DataFrame({"kept converged": by["converged"].mean(), "mean iterations": by["n_iter"].mean(),
                        "at the cap": by["n_iter"].apply(lambda s: (s >= cap).mean())}).to_string())
    print("stopped by:", frame["stop_reason"].value_counts().to_dict())


if __name__ == "__main__":
    main()
