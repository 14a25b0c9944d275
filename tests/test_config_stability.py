"""Every committed configuration keeps its fingerprint and cell hashes across refactors.

``tests/data/config_hashes.json`` holds, for every ``experiments/configs/*.toml``, the
fingerprint and the hash of every planned cell as computed by the code of commit 36f72b0
(before the sweep package was split). A change to them would break resume and cell reuse of
every existing run directory. Both include the package version: a version bump changes every
fingerprint and cell hash by design, and then this file is regenerated on purpose. A config whose
protocol changes on purpose (issue 17 gave calibration_exact, calibration_overspecified, quick and
the hora_* configs random starts and the control-perturbation ladder) gets its entry regenerated
by ``python tests/data/record_config_hashes.py NAME.toml``. The run
directories committed under ``experiments/results`` are checked against their own
``config.resolved.json`` as well.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hmoe_sim import __version__
from hmoe_sim.sweep import load_config, parse_config, plan_cells
from hmoe_sim.sweep.cells import cell_hash
from hmoe_sim.sweep.config import fingerprint_of

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = json.loads((Path(__file__).parent / "data" / "config_hashes.json").read_text())
RESOLVED = sorted((ROOT / "experiments" / "results").glob("*/config.resolved.json"))


def test_every_committed_config_is_recorded():
    assert sorted(p.name for p in (ROOT / "experiments" / "configs").glob("*.toml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fingerprint_and_cell_hashes_unchanged(name: str):
    config = load_config(ROOT / "experiments" / "configs" / name)
    expected = EXPECTED[name]
    assert config.fingerprint == expected["fingerprint"]
    assert {c.key: cell_hash(config, c) for c in plan_cells(config)} == expected["cells"]


@pytest.mark.parametrize("path", RESOLVED, ids=[p.parent.name for p in RESOLVED])
def test_committed_run_directories_resolve_to_their_fingerprint(path: Path):
    stored = json.loads(path.read_text())
    config = parse_config(stored["config"])
    assert config.to_dict() == stored["config"]
    assert config.fingerprint == stored["fingerprint"] == fingerprint_of(stored["config"], __version__)
