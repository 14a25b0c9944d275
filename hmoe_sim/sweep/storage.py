"""On-disk layout of a sweep run directory, with atomic writes.

::

    DIR/config.resolved.json      the resolved configuration (every default) + fingerprint
    DIR/cells/<fingerprint>/<cell key>.parquet   one finished cell (written atomically)
    DIR/results.parquet           one row per fit: the cells of the current fingerprint, sorted
    DIR/rates.csv                 one row per (series, loss): fitted slope with its CI
    DIR/summary.csv               per (series, n): fit counts, flagged fits, loss means and SDs
    DIR/boundary.csv              per (series, boundary kind): fits that ended at that bound
    DIR/per_truth.csv             truth ensembles: per (truth, H, series, loss) slope and verdict
    DIR/ensemble.csv              truth ensembles: per (H, loss) shared vs non-shared over truths

Cells live under their configuration's fingerprint, so a changed configuration never reads
a stale cell. Every file is written to a temporary name in the same directory and moved in
place with ``os.replace``; a sweep killed at any moment leaves only whole files behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from hmoe_sim.sweep.cells import Cell
from hmoe_sim.sweep.config import SweepConfig, parse_config

__all__ = ["RunDir", "atomic_write"]

CONFIG_FILE = "config.resolved.json"
RESULTS_FILE = "results.parquet"
RATES_FILE = "rates.csv"
SUMMARY_FILE = "summary.csv"
BOUNDARY_FILE = "boundary.csv"
PER_TRUTH_FILE = "per_truth.csv"
ENSEMBLE_FILE = "ensemble.csv"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp_path)`` and move it in place atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunDir:
    """A sweep's output directory.

    Parameters
    ----------
    path : str or Path
        The directory (created on first write).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ configuration
    def write_config(self, config: SweepConfig) -> None:
        """Store the resolved configuration and its fingerprint."""
        body = {"fingerprint": config.fingerprint, "config": config.to_dict()}
        text = json.dumps(body, indent=2, sort_keys=True) + "\n"
        atomic_write(self.path / CONFIG_FILE, lambda p: p.write_text(text))

    def read_config(self) -> SweepConfig:
        """The configuration stored by :meth:`write_config` (validated again)."""
        f = self.path / CONFIG_FILE
        if not f.is_file():
            raise ValueError(f"{str(self.path)!r} is not a sweep directory: {CONFIG_FILE} is missing")
        body = json.loads(f.read_text())
        return parse_config(body["config"])

    # ------------------------------------------------------------------ cells
    def cell_dir(self, fingerprint: str) -> Path:
        return self.path / "cells" / fingerprint

    def cell_path(self, fingerprint: str, cell: Cell) -> Path:
        return self.cell_dir(fingerprint) / f"{cell.key}.parquet"

    def has_cell(self, fingerprint: str, cell: Cell) -> bool:
        return self.cell_path(fingerprint, cell).is_file()

    def write_cell(self, fingerprint: str, cell: Cell, frame: pd.DataFrame) -> None:
        """Store one finished cell atomically."""
        atomic_write(self.cell_path(fingerprint, cell), lambda p: frame.to_parquet(p, index=False))

    def read_cells(self, fingerprint: str, cells: list[Cell]) -> pd.DataFrame:
        """Concatenate stored cells (all must exist), sorted by truth, series, control, n, replication."""
        frames = [pd.read_parquet(self.cell_path(fingerprint, c)) for c in cells]
        out = pd.concat(frames, ignore_index=True)
        return out.sort_values(["truth", "series", "control", "n", "replication"], kind="stable"
                               ).reset_index(drop=True)

    # ------------------------------------------------------------------ tables
    def write_table(self, name: str, frame: pd.DataFrame) -> Path:
        """Write ``results.parquet`` (parquet) or a ``.csv`` table atomically."""
        target = self.path / name
        if name.endswith(".parquet"):
            atomic_write(target, lambda p: frame.to_parquet(p, index=False))
        else:
            atomic_write(target, lambda p: frame.to_csv(p, index=False, float_format="%.6g"))
        return target

    def read_results(self) -> pd.DataFrame:
        f = self.path / RESULTS_FILE
        if not f.is_file():
            raise ValueError(f"{str(f)!r} does not exist; run `hmoe-sim sweep` first")
        return pd.read_parquet(f)

    def read_rates(self) -> pd.DataFrame:
        f = self.path / RATES_FILE
        if not f.is_file():
            raise ValueError(f"{str(f)!r} does not exist; run `hmoe-sim sweep` or `hmoe-sim report` first")
        return pd.read_csv(f)

