"""The tables a sweep derives from its results, and their writing into the run directory.

``rates.csv``, ``summary.csv`` and ``boundary.csv`` (:mod:`hmoe_sim.sweep.report`), for a
truth ensemble with shared / non-shared pairs ``per_truth.csv`` and ``ensemble.csv``
(:mod:`hmoe_sim.sweep.ensemble`), and ``d1_sources.csv`` (:mod:`hmoe_sim.sweep.stored`).
``hmoe-sim sweep`` writes them after the cells; ``hmoe-sim report`` recomputes them from
``results.parquet``.
"""

from __future__ import annotations

import pandas as pd

from hmoe_sim.sweep.config import SweepConfig
from hmoe_sim.sweep.ensemble import ensemble_table, per_truth_table, structure_pairs
from hmoe_sim.sweep.report import boundary_table, rates_table, summary_table
from hmoe_sim.sweep.storage import (
    BOUNDARY_FILE,
    D1_SOURCES_FILE,
    ENSEMBLE_FILE,
    PER_TRUTH_FILE,
    RATES_FILE,
    SUMMARY_FILE,
    RunDir,
)
from hmoe_sim.sweep.stored import d1_sources_table, has_stored_params

__all__ = ["derived_tables", "write_tables"]


def write_tables(run: RunDir, config: SweepConfig, results: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write ``results.parquet`` and the tables derived from it; return ``(rates, summary)``.

    ``results`` holds one row per fit with the run fingerprint in its first column; the
    fingerprint is also stored in ``results.parquet``'s metadata and as a last column
    ``fingerprint`` of every derived table (:func:`derived_tables`; ``report`` and ``plot`` check each
    against ``config.resolved.json``, so a sweep killed between two of these files leaves a
    directory they refuse rather than tables that disagree). Besides ``rates.csv``, ``summary.csv`` and
    ``boundary.csv``, a truth ensemble with shared / non-shared pairs gets ``per_truth.csv``
    and ``ensemble.csv`` (:mod:`hmoe_sim.sweep.ensemble`).
    """
    run.write_results(results, config.fingerprint)
    tables = derived_tables(results, config)
    for name, table in tables.items():
        run.write_table(name, table, config.fingerprint)
    return tables[RATES_FILE], tables[SUMMARY_FILE]


def derived_tables(results: pd.DataFrame, config: SweepConfig) -> dict[str, pd.DataFrame]:
    """Every table computed from ``results``, by file name, in the order they are written.

    ``rates.csv``, ``summary.csv``, ``boundary.csv``, and for a truth ensemble with shared /
    non-shared pairs ``per_truth.csv`` and ``ensemble.csv``, and where ``D1`` is recorded and every
    fit carries its parameter vector ``d1_sources.csv`` (:func:`hmoe_sim.sweep.stored.d1_sources_table`).
    """
    rates = rates_table(results, config)
    tables = {RATES_FILE: rates, SUMMARY_FILE: summary_table(results, config), BOUNDARY_FILE: boundary_table(results)}
    if len(config.truth_seeds) > 1 and structure_pairs(config):
        per_truth = per_truth_table(rates, config, results)
        tables[PER_TRUTH_FILE] = per_truth
        tables[ENSEMBLE_FILE] = ensemble_table(per_truth, config, results)
    if "D1" in config.losses.kinds and has_stored_params(results):
        tables[D1_SOURCES_FILE] = d1_sources_table(config, results)
    return tables
