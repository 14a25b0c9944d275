"""Convergence-rate sweeps: configuration, cell plan, storage, runner and report.

``hmoe-sim sweep CONFIG --out DIR`` runs :func:`run_sweep`; the pieces are

* :mod:`~hmoe_sim.sweep.config` -- the TOML schema, validated before any fitting;
* :mod:`~hmoe_sim.sweep.cells` -- cells (series, n, chunk of replications) and their seeds;
* :mod:`~hmoe_sim.sweep.storage` -- the run directory, atomic per-cell files, resume;
* :mod:`~hmoe_sim.sweep.runner` -- one cell's fits and losses, the joblib / dask fan-out;
* :mod:`~hmoe_sim.sweep.report` -- rates per series and loss, flagged-fit counts.
"""

from hmoe_sim.sweep.cells import Cell, plan_cells
from hmoe_sim.sweep.config import SweepConfig, load_config, parse_config
from hmoe_sim.sweep.runner import SweepOutcome, run_cell, run_sweep
from hmoe_sim.sweep.storage import RunDir

__all__ = ["Cell", "RunDir", "SweepConfig", "SweepOutcome", "load_config", "parse_config", "plan_cells", "run_cell",
           "run_sweep"]
