"""The cell plan of a sweep and the seeds of every cell.

A *cell* is one series, one sample size and one chunk of consecutive replications; it is the
unit of work, of parallelism and of storage. Seeds come from
:func:`hmoe_sim.data.cell_seed` and depend only on the root seed and the cell's coordinates,
never on the order in which cells run:

* data of replication ``r`` at size ``n``: ``cell_seed(root, "data", n, r)`` -- the same
  for every series, so series fitted to the same truth see the same data sets (a paired
  comparison);
* the initialisation of a cell: ``cell_seed(root, "init", series, n, chunk)``;
* the evaluation points of the L2 error: ``cell_seed(root, "l2")`` (one set for all fits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hmoe_sim.data import cell_seed
from hmoe_sim.sweep.config import SweepConfig

__all__ = ["Cell", "plan_cells", "data_seeds", "init_seed", "l2_seed", "seed_int"]


@dataclass(frozen=True, order=True)
class Cell:
    """One unit of work: ``series`` at sample size ``n``, replications ``reps``.

    Attributes
    ----------
    series : str
        Series name (from the configuration).
    n : int
        Sample size.
    chunk : int
        Chunk index (replications ``chunk * chunk_size ...``).
    reps : tuple of int
        The replication indices of this cell.
    """

    series: str
    n: int
    chunk: int
    reps: tuple[int, ...]

    @property
    def key(self) -> str:
        """File-name-safe identifier, unique within a sweep."""
        return f"{self.series.replace('/', '__')}__n{self.n}__c{self.chunk}"


def plan_cells(config: SweepConfig) -> list[Cell]:
    """Every cell of the sweep, in (series, n, chunk) order."""
    reps = config.replications
    size = int(config.data["sample"]["chunk"])
    chunks = [tuple(range(start, min(start + size, reps))) for start in range(0, reps, size)]
    return [Cell(s["name"], n, c, r) for s in config.series for n in config.sizes for c, r in enumerate(chunks)]


def data_seeds(root_seed: int, n: int, reps: tuple[int, ...]) -> list[np.random.SeedSequence]:
    """Seeds of the data sets of replications ``reps`` at size ``n``."""
    return [cell_seed(root_seed, "data", n, r) for r in reps]


def init_seed(root_seed: int, cell: Cell) -> int:
    """Integer seed of a cell's initialisation (random perturbations or random starts)."""
    return seed_int(cell_seed(root_seed, "init", cell.series, cell.n, cell.chunk))


def l2_seed(root_seed: int) -> int:
    """Integer seed of the L2-error evaluation points (shared by every fit of a sweep)."""
    return seed_int(cell_seed(root_seed, "l2"))


def seed_int(seq: np.random.SeedSequence) -> int:
    """A 63-bit integer drawn from a seed sequence (fits int64 columns and torch seeds)."""
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
