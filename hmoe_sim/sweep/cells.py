"""The cell plan of a sweep and the seeds of every cell.

A *cell* is one truth, one series (or its noise-free control), one sample size, on a noise
axis (``sample.noise_levels``) one noise level, and one block of consecutive replications; it
is the unit of work, of parallelism and of storage. Blocks
are fixed: block ``c`` holds replications ``c * chunk ... c * chunk + chunk - 1`` (fewer in
the last block), so adding replications never changes an existing block's content. Seeds
come from :func:`hmoe_sim.data.cell_seed` and depend only on the root seed and the
coordinates of what they seed -- never on the series name, the block, the number of jobs or
the order in which cells run:

* data of replication ``r`` at size ``n`` for truth ``t``: ``cell_seed(root, "data", t, n, r)``
  -- the same for every series, so every series of a truth sees the same data sets (a paired
  comparison); a noise-free control uses the same inputs with the noise left out. The noise
  level is *not* a coordinate of the data seed: replication ``r`` draws its inputs ``X`` and a
  standard-normal noise vector ``eps`` once, and at noise level ``sigma`` its responses are
  ``y = f*(X) + sigma * eps`` (:func:`hmoe_sim.data.sample`), so the noise ladder is paired:
  the same ``X`` and ``eps`` at every level;
* start ``s`` of that replication: ``cell_seed(root, "start", t, n, r, s)`` -- the same for
  every series, its control and every noise level, applied to each fitted structure's own
  parameters;
* minibatch permutations (SGD) of that replication: ``cell_seed(root, "sgd", t, n, r)``;
* the evaluation points of the L2 error: ``cell_seed(root, "l2")`` (one set for all fits).

On a noise axis the noisy cells are planned once per noise level, and every control (the
noise-free control and the ladder's rungs, whose data do not depend on the noise level) once
per (truth, series, n, block): a control cell carries no noise level (``sigma`` is ``None``).
:func:`cell_noise` gives the noise standard deviation of a cell's data (``results.parquet``'s
``noise_std``): the cell's level on a noise axis, the truth's ``noise_std`` without one, ``0``
for a control.

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
from hmoe_sim.models.presets import make_preset
from hmoe_sim.sweep.config import SweepConfig

__all__ = ["CELL_SCHEMA_VERSION", "Cell", "cell_hash", "cell_noise", "cell_spec", "effective_size", "plan_cells",
           "data_seeds", "start_seeds", "sgd_seeds", "l2_seed", "seed_int", "truth_noise_std"]

#: version of the cell layout and of :func:`cell_spec`; raising it recomputes every stored cell
CELL_SCHEMA_VERSION = 2


@dataclass(frozen=True, order=True)
class Cell:
    """One unit of work: ``series`` on truth ``truth`` at sample size ``n``, replications ``reps``.

    Attributes
    ----------
    truth : int
        Truth seed (one of ``truth.seeds``).
    series : str
        Series name (from the configuration).
    control : str
        ``""`` for the series itself, or the name of a control (``"noise_free"``, or a rung
        ``"perturb_<p>"`` of the control-perturbation ladder).
    n : int
        Sample size.
    chunk : int
        Block index (replications ``chunk * sample.chunk ...``).
    reps : tuple of int
        The replication indices of this cell.
    sigma : float or None
        The noise level of a noisy cell on a noise axis (``sample.noise_levels``); ``None``
        without a noise axis and for every control. Enters :attr:`key` and the cell hash only
        when set, so cells of configurations without a noise axis keep their keys and hashes.
    """

    truth: int
    series: str
    control: str
    n: int
    chunk: int
    reps: tuple[int, ...]
    sigma: float | None = None

    @property
    def key(self) -> str:
        """File-name-safe identifier, unique within a sweep (``__s<sigma>`` with a noise level: its ``repr``)."""
        control = f"__{self.control}" if self.control else ""
        sigma = "" if self.sigma is None else f"__s{self.sigma!r}"
        return f"t{self.truth}__{self.series.replace('/', '__')}{control}__n{self.n}{sigma}__c{self.chunk}"


def plan_cells(config: SweepConfig) -> list[Cell]:
    """Every cell of the sweep, in (truth, series, control, n, noise level, block) order, then the ladder's.

    On a noise axis the noisy cells (control ``""``) are planned at every noise level and each
    control once (no noise level). The control-perturbation ladder
    (:attr:`SweepConfig.control_perturbations`) adds, per truth and series, one control per
    rung at the largest n only.
    """
    reps = config.replications
    size = config.sample.chunk
    blocks = [tuple(range(start, min(start + size, reps))) for start in range(0, reps, size)]
    controls = ["", *config.controls]
    ladder = list(config.control_perturbations)
    n_max = max(config.sizes)

    def levels(control: str) -> list[float | None]:
        return list(config.noise_levels) if config.noise_levels and control == "" else [None]

    return [Cell(t, s.name, c, n, b, r, sigma) for t in config.truth_seeds for s in config.series
            if t in s.truth_seeds for c in controls for n in config.sizes for sigma in levels(c)
            for b, r in enumerate(blocks)] + \
        [Cell(t, s.name, c, n_max, b, r) for t in config.truth_seeds for s in config.series
         if t in s.truth_seeds for c in ladder for b, r in enumerate(blocks)]


def truth_noise_std(config: SweepConfig, series: str) -> float:
    """The noise standard deviation of ``series``' truth (its preset's ``noise_std`` with its truth options)."""
    s = config.series_named(series)
    return float(make_preset(s.preset, seed=s.truth_seeds[0], **s.truth_options).noise_std)


def effective_size(n: int, noise_std: float) -> float:
    """The effective sample size ``n / noise_std**2`` of a fit's data (``inf`` without noise)."""
    return float(n) / noise_std**2 if noise_std > 0 else float("inf")


def cell_noise(config: SweepConfig, cell: Cell, truth_noise: float | None = None) -> float:
    """The noise standard deviation of ``cell``'s data (``results.parquet``'s ``noise_std``).

    ``0`` for every control; the cell's noise level on a noise axis; otherwise the truth's
    ``noise_std`` (``truth_noise`` when given, else :func:`truth_noise_std`).
    """
    if cell.control:
        return 0.0
    if cell.sigma is not None:
        return float(cell.sigma)
    return truth_noise_std(config, cell.series) if truth_noise is None else float(truth_noise)


def cell_spec(config: SweepConfig, cell: Cell) -> dict[str, Any]:
    """Everything that determines the numbers of ``cell`` (a JSON-able dict).

    The root seed, device, dtype and torch threads; the truth section without the list of
    truth seeds (the cell's own truth seed is ``cell.truth``); the cell's series
    (preset, truth options, structure, fit protocol; not its name, which the cell carries, nor
    its list of truths);
    the input distribution ``sample.x_dist``; the losses section; every field of the cell
    (:func:`dataclasses.asdict`, so fields added to :class:`Cell` enter automatically; ``sigma``
    only when set, so that cells without a noise level keep their hashes); the package version
    and :data:`CELL_SCHEMA_VERSION`. Not in it: ``name``, ``description``,
    the other sizes, the replication count and ``sample.chunk`` (the cell's replications are
    its own field).

    Raises
    ------
    ValueError
        If ``cell.series`` is not a series of ``config``.
    """
    try:
        series = config.series_named(cell.series)
    except ValueError as err:
        raise ValueError(f"cell {cell.key!r}: {err}") from None
    spec = {
        "schema": CELL_SCHEMA_VERSION,
        "version": __version__,
        "root_seed": config.root_seed,
        "device": config.device,
        "dtype": config.dtype,
        "threads": config.threads,
        "truth": {k: v for k, v in config.truth.to_dict().items() if k != "seeds"},  # the cell's own is cell.truth
        "series": {k: v for k, v in series.to_dict().items() if k not in ("name", "truth_seeds")},
        "x_dist": config.sample.x_dist,
        "losses": config.losses.to_dict(),
        "cell": {k: v for k, v in dataclasses.asdict(cell).items() if not (k == "sigma" and v is None)},
    }
    return json.loads(json.dumps(spec, sort_keys=True))


def cell_hash(config: SweepConfig, cell: Cell) -> str:
    """SHA-256 (first 16 hex digits) of :func:`cell_spec`: the key a stored cell is checked against."""
    payload = json.dumps(cell_spec(config, cell), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def data_seeds(root_seed: int, truth: int, n: int, reps: tuple[int, ...]) -> list[np.random.SeedSequence]:
    """Seeds of the data sets of replications ``reps`` at size ``n`` for truth ``truth``."""
    return [cell_seed(root_seed, "data", truth, n, r) for r in reps]


def start_seeds(root_seed: int, truth: int, n: int, reps: tuple[int, ...], n_starts: int) -> list[list[int]]:
    """Integer seeds of every start: ``[replication][start]``."""
    return [[seed_int(cell_seed(root_seed, "start", truth, n, r, s)) for s in range(n_starts)] for r in reps]


def sgd_seeds(root_seed: int, truth: int, n: int, reps: tuple[int, ...]) -> list[np.random.SeedSequence]:
    """Seeds of the minibatch permutations of each replication (SGD protocols)."""
    return [cell_seed(root_seed, "sgd", truth, n, r) for r in reps]


def l2_seed(root_seed: int) -> int:
    """Integer seed of the L2-error evaluation points (shared by every fit of a sweep)."""
    return seed_int(cell_seed(root_seed, "l2"))


def seed_int(seq: np.random.SeedSequence) -> int:
    """A 63-bit integer drawn from a seed sequence (fits int64 columns and torch seeds)."""
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
