"""On-disk layout of a sweep run directory: atomic writes, a lock, verified cells.

::

    DIR/.hmoe-sim.lock            held by the running sweep (pid, host, start time)
    DIR/config.resolved.json      the resolved configuration (every default) + run fingerprint
    DIR/cells/<cell key>__<cell hash>.parquet   one finished cell (written atomically)
    DIR/results.parquet           one row per fit, with the run fingerprint (column + metadata)
    DIR/rates.csv                 one row per (series, loss): fitted slope with its CI
    DIR/summary.csv               per (series, n): fit counts, flagged fits, loss means and SDs
    DIR/boundary.csv              per (series, boundary kind): fits that ended at that bound
    DIR/per_truth.csv             truth ensembles: per (truth, H, series, loss) slope and verdict
    DIR/ensemble.csv              truth ensembles: per (H, loss) shared vs non-shared over truths
    DIR/d1_sources.csv            per (truth, series): the shares of D1 from masses, locations, the box

Two fingerprints. The *run fingerprint* (:attr:`SweepConfig.fingerprint`, over the whole
resolved configuration) names the run: it is stored in ``config.resolved.json`` (with the
package version that computed it) and with ``results.parquet``, and as a ``fingerprint``
column of ``rates.csv``, ``summary.csv`` and the other derived tables. ``report`` / ``plot``
recompute it from the stored configuration, check that ``results.parquet`` carries it and
holds exactly one row per planned fit (:meth:`RunDir.read_checked`), and ``plot`` that the
tables it draws carry it (:meth:`RunDir.check_table`); any disagreement is refused in one
line that says how to recover. The *cell hash* (:func:`~hmoe_sim.sweep.cells.cell_hash`, over
what determines one cell's numbers) names a cell file, so a change of ``description``, an added
size or added replications reuse every cell whose numbers cannot have changed. Every cell file
carries its key, its hash and the run fingerprint that wrote it in the parquet metadata, and is
verified before reuse (:meth:`RunDir.load_cell`): readable, the key and hash it claims, the
key columns and every loss column, and one row per replication of the cell with the cell's
coordinates.

Every file is written by :func:`hmoe_sim.files.atomic_write`: to a temporary name in the same
directory (created exclusively, never through a symbolic link, with mode ``0666`` less the
umask like any other file) and moved in place with ``os.replace``; a sweep killed at any moment
leaves only whole files behind, plus at most some temporary files of the package's own pattern
(``.<name>.hmoe-sim-<pid>-<hex>.tmp``) that the next sweep into the directory removes (no other
file). A symbolic link at any path the package writes is refused before work, naming it.

The lock is an ``flock`` on ``DIR/.hmoe-sim.lock``, which also records the holder
(:mod:`~hmoe_sim.sweep.lock`); a lock file left by a killed sweep is taken over with a notice.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hmoe_sim import __version__
from hmoe_sim.files import atomic_write, refuse_symlink, remove_own_temporaries
from hmoe_sim.sweep.cells import CELL_SCHEMA_VERSION, Cell, cell_noise, effective_size, plan_cells, truth_noise_std
from hmoe_sim.sweep.config import SweepConfig, fingerprint_of, parse_config
from hmoe_sim.sweep.lock import LOCK_FILE, hold_lock, read_lock_info

__all__ = ["CellInvalid", "RunDir", "atomic_write", "with_noise_columns"]

CONFIG_FILE = "config.resolved.json"
RESULTS_FILE = "results.parquet"
RATES_FILE = "rates.csv"
SUMMARY_FILE = "summary.csv"
BOUNDARY_FILE = "boundary.csv"
PER_TRUTH_FILE = "per_truth.csv"
ENSEMBLE_FILE = "ensemble.csv"
D1_SOURCES_FILE = "d1_sources.csv"
CELLS_DIR = "cells"
#: parquet key-value metadata key of the hmoe-sim record in cell files and results.parquet
METADATA_KEY = b"hmoe_sim"
#: columns every cell file must have (besides the configured loss columns)
CELL_KEY_COLUMNS = ("truth", "series", "control", "n", "replication")


def with_noise_columns(results: pd.DataFrame, config: SweepConfig) -> pd.DataFrame:
    """``results`` with ``noise_std`` and ``n_eff`` filled in where they are missing.

    Cells and results written before these columns existed (no noise axis) lack them; their
    values follow from the configuration: the truth's ``noise_std`` for a noisy fit, ``0`` and
    ``inf`` for a control (:func:`~hmoe_sim.sweep.cells.cell_noise`). Rows that carry them keep
    them. Returns a new frame; the columns follow ``n``.
    """
    out = results.copy()
    control = out["control"].fillna("").astype(str) if "control" in out else pd.Series("", index=out.index)
    old = out["noise_std"].to_numpy(dtype=float) if "noise_std" in out else None
    sigma = pd.Series(0.0, index=out.index)
    for name in dict.fromkeys(out["series"]):
        sigma[(out["series"] == name) & (control == "")] = truth_noise_std(config, str(name))
    if old is not None:
        sigma = sigma.where(pd.isna(old), old)
    out = out.drop(columns=["noise_std", "n_eff"], errors="ignore")
    at = list(out.columns).index("n") + 1 if "n" in out else len(out.columns)
    out.insert(at, "noise_std", sigma.astype(float))
    n_eff = [effective_size(int(n), float(v)) for n, v in zip(out["n"], out["noise_std"], strict=True)]
    out.insert(at + 1, "n_eff", pd.Series(n_eff, index=out.index, dtype=float))
    return out


class CellInvalid(ValueError):
    """A stored cell file failed verification (the message says why)."""


def _write_parquet(sink: Any, frame: pd.DataFrame, record: dict[str, Any]) -> None:
    """Write ``frame`` (no index) to parquet (``sink``: a path or an open binary file) with ``record`` as JSON in
    the schema metadata."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[METADATA_KEY] = json.dumps(record, sort_keys=True).encode()
    pq.write_table(table.replace_schema_metadata(metadata), sink)


def _parquet_record(path: Path) -> dict[str, Any] | None:
    """The hmoe-sim metadata record of a parquet file (``None`` when it has none)."""
    metadata = pq.read_schema(path).metadata or {}
    raw = metadata.get(METADATA_KEY)
    return None if raw is None else json.loads(raw)


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

    # ------------------------------------------------------------------ checks before any work
    def check_writable(self) -> None:
        """Raise ``ValueError`` if the directory cannot be a writable run directory.

        Fails when the path is an existing file (or its nearest existing ancestor is), or when
        the directory (or, if it does not exist yet, that ancestor) is not writable.
        """
        p = self.path
        if p.exists() and not p.is_dir():
            raise ValueError(f"--out {str(p)!r} is an existing file, not a directory")
        probe = p
        while not probe.exists():
            if probe.is_symlink():
                raise ValueError(f"--out {str(p)!r} cannot be created: {str(probe)!r} is a dangling symbolic link "
                                 f"(to {os.readlink(probe)!r}); remove it or make it point at a directory")
            if probe.parent == probe:
                break
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            raise ValueError(f"--out {str(p)!r} cannot be created: {str(probe)!r} is a file")
        if not os.access(probe, os.W_OK | os.X_OK):
            what = "the run directory" if probe == p else "its parent directory"
            raise ValueError(f"--out {str(p)!r} is not writable: no write permission on {what} {str(probe)!r}")

    def check_layout(self, cells: Sequence[tuple[Cell, str]], figure: str | None = None) -> None:
        """Raise ``ValueError`` naming the first path of the run directory that has the wrong kind.

        ``cells/`` must be a directory; the lock file, ``config.resolved.json``,
        ``results.parquet``, the tables, the figure ``figure`` (a file name) and the file of
        every planned ``(cell, cell hash)`` must be regular files when they exist (a directory
        there would fail only when written). None of them may be a symbolic link: the package
        writes only its own files, never through a link (:func:`hmoe_sim.files.refuse_symlink`).
        """
        if not self.path.is_dir():
            return
        names = [LOCK_FILE, CONFIG_FILE, RESULTS_FILE, RATES_FILE, SUMMARY_FILE, BOUNDARY_FILE, PER_TRUTH_FILE,
                 ENSEMBLE_FILE, D1_SOURCES_FILE, *([figure] if figure is not None else [])]
        files = [self.path / n for n in names]
        cell_dir = self.cell_dir()
        refuse_symlink(cell_dir)
        if cell_dir.exists() and not cell_dir.is_dir():
            raise ValueError(f"{str(cell_dir)!r} is a file, not the directory of cell files; remove it")
        if cell_dir.is_dir():
            files += [self.cell_path(c, h) for c, h in cells]
        for f in files:
            refuse_symlink(f)
            if f.exists() and not f.is_file():
                raise ValueError(f"{str(f)!r} is a directory (or another non-file) where a file belongs; remove it")

    def writable(self) -> bool:
        """Whether files can be written in the (existing) directory."""
        return self.path.is_dir() and os.access(self.path, os.W_OK | os.X_OK)

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self, notify: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the directory's exclusive lock for the duration of the ``with`` block.

        Raises
        ------
        RunLocked
            When another process holds it; the message names that process (pid, host and
            start time).

        Notes
        -----
        A lock file left by a sweep that was killed (its ``flock`` is gone with it) is taken
        over with a notice through ``notify``, and the temporary files such a sweep may have
        left are removed (only names of the package's own pattern whose writer is gone,
        :func:`hmoe_sim.files.remove_own_temporaries`; :func:`hmoe_sim.sweep.lock.hold_lock`).
        """
        with hold_lock(self.path, notify, on_takeover=self._remove_temporary_files):
            yield

    def lock_holder(self) -> dict[str, Any]:
        """What the lock file records (``{}`` when there is none): ``pid``, ``host``, ``started``."""
        return read_lock_info(self.path / LOCK_FILE)

    def _remove_temporary_files(self, say: Callable[[str], None]) -> None:
        removed = sum(remove_own_temporaries(d) for d in (self.path, self.path / CELLS_DIR))
        if removed:
            say(f"removed {removed} partial file(s) the killed sweep left behind")

    # ------------------------------------------------------------------ configuration
    def write_config(self, config: SweepConfig) -> None:
        """Store the resolved configuration, its fingerprint and the package version that hashed it."""
        body = {"fingerprint": config.fingerprint, "config": config.to_dict(), "version": __version__}
        text = json.dumps(body, indent=2, sort_keys=True) + "\n"
        atomic_write(self.path / CONFIG_FILE, lambda f: f.write(text.encode()))

    def _config_body(self) -> dict[str, Any]:
        f = self.path / CONFIG_FILE
        if not f.is_file():
            raise ValueError(f"{str(self.path)!r} is not a sweep directory: {CONFIG_FILE} is missing")
        try:
            body = json.loads(f.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(f)!r} is not valid JSON ({err}); rerun the sweep to rewrite it") from err
        if not isinstance(body, dict) or "config" not in body:
            raise ValueError(f"{str(f)!r} is not a resolved sweep configuration; rerun the sweep to rewrite it")
        return body

    def read_config(self) -> SweepConfig:
        """The configuration stored by :meth:`write_config` (validated again)."""
        return parse_config(self._config_body()["config"])

    def stored_fingerprint(self) -> str:
        """The run fingerprint recorded in ``config.resolved.json`` when it was written."""
        return str(self._config_body().get("fingerprint", ""))

    def verified_fingerprint(self, notify: Callable[[str], None] | None = None) -> str:
        """The stored run fingerprint, after recomputing it from the stored configuration.

        The hash is taken over exactly what ``config.resolved.json`` holds (its ``config``
        and the package ``version`` recorded beside it). A file written before the version
        was recorded is hashed with the running version; if that does not reproduce the
        stored fingerprint the file is accepted with a notice through ``notify`` (it cannot be
        verified), since a package upgrade alone changes the hash.

        Raises
        ------
        ValueError
            When the stored configuration does not hash to the stored fingerprint (the file
            was edited after the sweep), with how to recover.
        """
        body = self._config_body()
        stored = str(body.get("fingerprint", ""))
        version = body.get("version")
        computed = fingerprint_of(body["config"], str(version if version is not None else __version__))
        if computed == stored:
            return stored
        f = self.path / CONFIG_FILE
        if version is None:
            if notify is not None:
                notify(f"note: {str(f)!r} records no package version (older hmoe-sim); its fingerprint {stored} "
                       "could not be verified")
            return stored
        raise ValueError(f"{str(f)!r} records fingerprint {stored} but its config hashes to {computed}: the file was "
                         "edited after the sweep; restore it, or rerun `hmoe-sim sweep CONFIG --out "
                         f"{self.path}` (finished cells are reused)")

    # ------------------------------------------------------------------ cells
    def figure_path(self, name: str) -> Path:
        """The figure of the run of configuration ``name``: ``DIR/<name>.png``."""
        return self.path / f"{name}.png"

    def cell_dir(self) -> Path:
        return self.path / CELLS_DIR

    def cell_path(self, cell: Cell, cell_hash: str) -> Path:
        """``DIR/cells/<cell key>__<cell hash>.parquet``."""
        return self.cell_dir() / f"{cell.key}__{cell_hash}.parquet"

    def has_cell(self, cell: Cell, cell_hash: str) -> bool:
        """Whether a file for this cell and hash exists (not whether it is valid: see :meth:`load_cell`)."""
        return self.cell_path(cell, cell_hash).is_file()

    def write_cell(self, cell: Cell, cell_hash: str, frame: pd.DataFrame, fingerprint: str) -> None:
        """Store one finished cell atomically, with its key, hash and run fingerprint as metadata."""
        record = {"cell_key": cell.key, "cell_hash": cell_hash, "fingerprint": fingerprint,
                  "schema": CELL_SCHEMA_VERSION, "rows": len(frame)}
        atomic_write(self.cell_path(cell, cell_hash), lambda f: _write_parquet(f, frame, record))

    def load_cell(self, cell: Cell, cell_hash: str, loss_columns: Sequence[str]) -> pd.DataFrame:
        """Read one stored cell and verify it.

        Raises
        ------
        FileNotFoundError
            No file for this cell and hash.
        CellInvalid
            The file is unreadable (e.g. truncated), claims another key or hash, lacks a key
            column (``truth, series, control, n, replication``) or a loss column, or does not hold exactly one
            row per replication of ``cell`` with the cell's coordinates.
        """
        path = self.cell_path(cell, cell_hash)
        if not path.is_file():
            raise FileNotFoundError(path)
        try:
            record = _parquet_record(path)
            frame = pq.read_table(path).to_pandas()
        except (OSError, pa.ArrowException, ValueError) as err:
            raise CellInvalid(f"unreadable ({type(err).__name__}: {str(err)[:120]})") from err
        if record is None:
            raise CellInvalid("carries no cell key or hash (written by an older version)")
        if record.get("cell_key") != cell.key or record.get("cell_hash") != cell_hash:
            raise CellInvalid(f"belongs to cell {record.get('cell_key')!r} with hash {record.get('cell_hash')!r}, "
                              f"not {cell.key!r} with hash {cell_hash!r}")
        missing = [c for c in (*CELL_KEY_COLUMNS, *loss_columns) if c not in frame.columns]
        if missing:
            raise CellInvalid(f"lacks column(s) {missing}")
        if len(frame) != len(cell.reps):
            raise CellInvalid(f"has {len(frame)} rows for {len(cell.reps)} replications")
        if sorted(frame["replication"].tolist()) != sorted(cell.reps):
            raise CellInvalid(f"holds replications {sorted(frame['replication'].tolist())}, "
                              f"not {sorted(cell.reps)}")
        for name, value in vars(cell).items():
            if name in frame.columns and isinstance(value, str | int) and not (frame[name] == value).all():
                raise CellInvalid(f"column {name!r} is not {value!r} in every row")
        if cell.sigma is not None and not ("noise_std" in frame.columns and (frame["noise_std"] == cell.sigma).all()):
            raise CellInvalid(f"column 'noise_std' is not the cell's noise level {cell.sigma!r} in every row")
        return frame

    # ------------------------------------------------------------------ tables
    def write_table(self, name: str, frame: pd.DataFrame, fingerprint: str | None = None) -> Path:
        """Write a ``.parquet`` or ``.csv`` table atomically.

        With ``fingerprint``, the table gets a last column ``fingerprint`` holding it: the run
        whose results the table was computed from (checked by :meth:`check_table`).
        """
        target = self.path / name
        if fingerprint is not None:
            frame = frame.assign(fingerprint=fingerprint)
        if name.endswith(".parquet"):
            atomic_write(target, lambda f: frame.to_parquet(f, index=False))
        else:
            atomic_write(target, lambda f: frame.to_csv(f, index=False, float_format="%.6g"))
        return target

    def write_results(self, frame: pd.DataFrame, fingerprint: str) -> Path:
        """Write ``results.parquet`` with the run fingerprint in its metadata."""
        target = self.path / RESULTS_FILE
        atomic_write(target, lambda f: _write_parquet(f, frame, {"fingerprint": fingerprint}))
        return target

    def results_fingerprint(self) -> str | None:
        """The run fingerprint stored with ``results.parquet`` (metadata, else the column)."""
        f = self.path / RESULTS_FILE
        record = _parquet_record(f)
        if record is not None and "fingerprint" in record:
            return str(record["fingerprint"])
        if "fingerprint" in pq.read_schema(f).names:
            values = pq.read_table(f, columns=["fingerprint"]).column("fingerprint").unique().to_pylist()
            return str(values[0]) if len(values) == 1 else None
        return None

    def read_results(self) -> pd.DataFrame:
        f = self.path / RESULTS_FILE
        if not f.is_file():
            raise ValueError(f"{str(f)!r} does not exist; run `hmoe-sim sweep` first")
        return pd.read_parquet(f)

    def read_checked(self, notify: Callable[[str], None] | None = None) -> tuple[SweepConfig, pd.DataFrame]:
        """The configuration and the results, after checking that they belong together.

        Raises
        ------
        ValueError
            When the stored configuration does not hash to its stored fingerprint
            (:meth:`verified_fingerprint`), when ``config.resolved.json`` and
            ``results.parquet`` carry different run fingerprints (a later sweep into the
            directory did not finish), or when ``results.parquet`` does not hold exactly one
            row per planned fit; with how to recover.
        """
        config = self.read_config()
        results = with_noise_columns(self.read_results(), config)
        stored = self.verified_fingerprint(notify)
        found = self.results_fingerprint()
        if found is None or found != stored:
            raise ValueError(
                f"{str(self.path)!r}: {CONFIG_FILE} (fingerprint {stored}, config {config.name!r}) does not describe "
                f"{RESULTS_FILE} (fingerprint {found}): a later sweep into this directory did not finish. Rerun that "
                f"sweep to completion (`hmoe-sim sweep CONFIG --out {self.path}`: finished cells are reused), or "
                "rerun the sweep that wrote these results")
        self._check_plan(config, results)
        return config, results

    def _check_plan(self, config: SweepConfig, results: pd.DataFrame) -> None:
        """Raise unless ``results`` holds exactly one row per planned fit (a noise level is part of a fit's key)."""
        keys = ["truth", "series", "control", "n", "noise_std", "replication"]
        missing_cols = [k for k in keys if k not in results.columns]
        f = self.path / RESULTS_FILE
        if missing_cols:
            raise ValueError(f"{str(f)!r} lacks column(s) {missing_cols}; rerun `hmoe-sim sweep CONFIG --out "
                             f"{self.path}` to rewrite it")
        truth_noise = {s.name: truth_noise_std(config, s.name) for s in config.series}
        planned = {(c.truth, c.series, c.control, c.n, cell_noise(config, c, truth_noise[c.series]), r)
                   for c in plan_cells(config) for r in c.reps}
        frame = results[keys].copy()
        frame["control"] = frame["control"].fillna("").astype(str)
        found = list(frame.itertuples(index=False, name=None))
        have = {(int(t), str(s), c, int(n), float(v), int(r)) for t, s, c, n, v, r in found}
        if len(found) != len(planned) or have != planned:
            lacking, extra = planned - have, have - planned
            what = f"{len(lacking)} planned fit(s) missing (e.g. truth, series, control, n, noise_std, replication = " \
                f"{min(lacking)})" if lacking else f"{len(extra)} unplanned fit(s) (e.g. {min(extra)})" if extra \
                else f"{len(found) - len(have)} duplicated fit(s)"
            raise ValueError(f"{str(f)!r} holds {len(found)} fits but the config plans {len(planned)}: {what}; "
                             f"rerun `hmoe-sim sweep CONFIG --out {self.path}` (finished cells are reused)")

    def check_table(self, name: str, fingerprint: str, notify: Callable[[str], None] | None = None) -> None:
        """Raise unless table ``name`` was written for run ``fingerprint``.

        A table without a ``fingerprint`` column (written by an older hmoe-sim) is accepted
        with a notice through ``notify``.
        """
        f = self.path / name
        if not f.is_file():
            return
        head = pd.read_csv(f, usecols=lambda c: c == "fingerprint", dtype=str)
        if "fingerprint" not in head.columns:
            if notify is not None:
                notify(f"note: {str(f)!r} carries no fingerprint (older hmoe-sim); rerun `hmoe-sim report "
                       f"{self.path}` to stamp it")
            return
        found = sorted(set(head["fingerprint"].dropna()))
        if found != [fingerprint]:
            shown = ", ".join(found) if found else "none"
            raise ValueError(f"{name} was written for fingerprint {shown} but config is {fingerprint}; rerun "
                             f"`hmoe-sim report {self.path}`")

    def read_rates(self, fingerprint: str | None = None, notify: Callable[[str], None] | None = None
                   ) -> pd.DataFrame:
        """``rates.csv`` (checked against run ``fingerprint`` when given, :meth:`check_table`)."""
        f = self.path / RATES_FILE
        if not f.is_file():
            raise ValueError(f"{str(f)!r} does not exist; run `hmoe-sim sweep` or `hmoe-sim report` first")
        if fingerprint is not None:
            self.check_table(RATES_FILE, fingerprint, notify)
        rates = pd.read_csv(f)
        return rates.drop(columns=["fingerprint"], errors="ignore")
