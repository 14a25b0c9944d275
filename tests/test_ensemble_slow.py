"""A truth-ensemble sweep end to end, through the CLI (slow; ``--runslow``): per-truth rates with
verdicts, the paired ensemble table and the forest plot, reproduced bit for bit by a second run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hmoe_sim.cli import main

CONFIG = """
name = "ensemble-small"
root_seed = 3

[truth]
preset = "hmoe-shared"
seeds = [1, 2, 3]
options = { expert_std = 2.0, gate_slope_std = 2.0, attention_std = 0.3, code_activation = "identity" }

[sample]
sizes = [300, 900]
replications = 3
chunk = 3
controls = ["noise_free"]

[fit]
method = "lm"
max_iter = 60
n_starts = 2

[[series]]
name = "shared"
structure = "shared"

[[series]]
name = "nonshared"
structure = "nonshared"

[losses]
kinds = ["D1"]
l2 = true
l2_n_eval = 1000
"""


@pytest.mark.slow
def test_truth_ensemble_sweep_writes_and_reproduces_its_tables(tmp_path: Path) -> None:
    config = tmp_path / "ensemble.toml"
    config.write_text(CONFIG)
    tables = {}
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["sweep", str(config), "--out", str(out), "--no-progress"]) == 0
        assert (out / "ensemble-small.png").read_bytes()[:4] == b"\x89PNG"
        tables[run] = {name: pd.read_csv(out / name) for name in ("per_truth.csv", "ensemble.csv", "rates.csv")}
    per_truth = tables["a"]["per_truth.csv"]
    assert sorted(per_truth["truth"].unique()) == [1, 2, 3] and set(per_truth["H"]) == {2}
    assert len(per_truth) == 3 * 2 * 2  # truths x series x losses (D1, L2)
    assert per_truth["verdict"].notna().all() and per_truth["control_level"].notna().all()
    ensemble = tables["a"]["ensemble.csv"]
    assert set(ensemble["loss"]) == {"D1", "L2"} and (ensemble["n_truths"] == 3).all()
    assert ensemble["verdict_pairs"].str.count(":").sum() >= 2
    for name in tables["a"]:
        pd.testing.assert_frame_equal(tables["a"][name], tables["b"][name], check_exact=True)
