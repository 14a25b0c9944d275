"""Convergence-rate sweeps: configuration, cell plan, storage, runner and report.

``hmoe-sim sweep CONFIG --out DIR`` runs :func:`run_sweep`; the pieces are

* :mod:`~hmoe_sim.sweep.config` -- the TOML schema, validated before any fitting;
* :mod:`~hmoe_sim.sweep.cells` -- cells (series, n, chunk of replications) and their seeds;
* :mod:`~hmoe_sim.sweep.storage` -- the run directory, atomic per-cell files, resume;
* :mod:`~hmoe_sim.sweep.setup` -- what one series fits and how it is scored, its fit box;
* :mod:`~hmoe_sim.sweep.checks` -- every check before work (options, memory, file names, dask);
* :mod:`~hmoe_sim.sweep.cell` -- one cell's fits and losses;
* :mod:`~hmoe_sim.sweep.backends` -- where cells run (in-process, a process pool, dask), the jobs cap;
* :mod:`~hmoe_sim.sweep.report`, :mod:`~hmoe_sim.sweep.ensemble` -- rates per series and loss,
  flagged-fit counts, truth-ensemble tables; :mod:`~hmoe_sim.sweep.tables` writes them;
* :mod:`~hmoe_sim.sweep.runner` -- orchestration, signals, progress.
"""

from hmoe_sim.sweep.cell import run_cell
from hmoe_sim.sweep.cells import Cell, plan_cells
from hmoe_sim.sweep.config import SweepConfig, load_config, parse_config
from hmoe_sim.sweep.runner import SweepOutcome, run_sweep
from hmoe_sim.sweep.storage import RunDir

__all__ = ["Cell", "RunDir", "SweepConfig", "SweepOutcome", "load_config", "parse_config", "plan_cells", "run_cell",
           "run_sweep"]
