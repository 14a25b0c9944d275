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

Chunks are fixed blocks of ``sample.chunk`` consecutive replications (the last one may be
shorter), so a cell's content never depends on how many replications the sweep has in all:
adding replications changes only the last, partial chunk and adds new ones.

Every cell has a *cell hash* (:func:`cell_hash`) over everything that determines its numbers
(:func:`cell_spec`); storage keys finished cells by ``cell.key`` and that hash, so a change
that leaves a cell's numbers alone (the ``description``, another ``n``, more replications)
reuses it, and any change that could move them recomputes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from hmoe_sim import __version__
from hmoe_sim.data import cell_seed
from hmoe_sim.sweep.config import SweepConfig

__all__ = ["CELL_SCHEMA_VERSION", "Cell", "cell_hash", "cell_spec", "plan_cells", "data_seeds", "init_seed",
           "l2_seed", "seed_int"]

#: version of the cell layout and of :func:`cell_spec`; raising it recomputes every stored cell
CELL_SCHEMA_VERSION = 1


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


def cell_spec(config: SweepConfig, cell: Cell) -> dict[str, Any]:
    """Everything that determines the numbers of ``cell`` (a JSON-able dict).

    The root seed, device, dtype and torch threads; the truth section; the cell's series
    (preset, truth options, structure, fit protocol; not its name, which the cell carries);
    the input distribution ``sample.x_dist``; the losses section; every field of the cell
    (:func:`dataclasses.asdict`, so fields added to :class:`Cell` enter automatically); the
    package version and :data:`CELL_SCHEMA_VERSION`. Not in it: ``name``, ``description``,
    the other sizes, the replication count and ``sample.chunk`` (the cell's replications are
    its own field).

    Raises
    ------
    ValueError
        If ``cell.series`` is not a series of ``config``.
    """
    data = config.data
    series = [s for s in data["series"] if s["name"] == cell.series]
    if not series:
        raise ValueError(f"cell {cell.key!r}: series {cell.series!r} is not in the configuration "
                         f"(series: {[s['name'] for s in data['series']]})")
    spec = {
        "schema": CELL_SCHEMA_VERSION,
        "version": __version__,
        "root_seed": data["root_seed"],
        "device": data["device"],
        "dtype": data["dtype"],
        "threads": data["threads"],
        "truth": data["truth"],
        "series": {k: v for k, v in series[0].items() if k != "name"},
        "x_dist": data["sample"]["x_dist"],
        "losses": data["losses"],
        "cell": dataclasses.asdict(cell),
    }
    return json.loads(json.dumps(spec, sort_keys=True))


def cell_hash(config: SweepConfig, cell: Cell) -> str:
    """SHA-256 (first 16 hex digits) of :func:`cell_spec`: the key a stored cell is checked against."""
    payload = json.dumps(cell_spec(config, cell), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
