"""Truth-free starts and the control-perturbation ladder (issue 17, items 2 and 3)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from hmoe_sim.sweep import parse_config, run_sweep
from hmoe_sim.sweep.cells import cell_hash, plan_cells

BASE = {
    "name": "ladder",
    "root_seed": 2,
    "truth": {"preset": "hmoe-shared", "seed": 1,
              "options": {"expert_std": 2.0, "gate_slope_std": 2.0, "attention_std": 0.3,
                          "code_activation": "identity", "noise_std": 0.05}},
    "sample": {"sizes": [150, 300], "replications": 2, "chunk": 2, "controls": ["noise_free"]},
    "fit": {"method": "lm", "max_iter": 300, "n_starts": 1},
    "series": [{"name": "shared", "structure": "shared"}, {"name": "nonshared", "structure": "nonshared"}],
    "losses": {"kinds": ["D1"], "l2": False},
}


def _config(**sample: object):
    raw = copy.deepcopy(BASE)
    raw["sample"].update(sample)
    return parse_config(raw)


def test_unused_optional_keys_stay_out_of_the_resolved_config():
    # so every configuration written before them keeps its fingerprint and cell hashes
    data = _config().to_dict()
    assert "control_perturbations" not in data["sample"]
    assert all("random_scale" not in s["fit"] for s in data["series"])


def test_random_scale_is_recorded_with_random_starts_and_refused_without():
    raw = copy.deepcopy(BASE)
    raw["fit"].update(random_starts=2)
    assert parse_config(raw).series[0].fit.random_scale == 1.0
    raw["fit"]["random_scale"] = 2.0
    scaled = parse_config(raw)
    assert scaled.series[0].fit.random_scale == 2.0
    # the scale moves the random starts, so it moves the cell hash
    unscaled = copy.deepcopy(raw)
    del unscaled["fit"]["random_scale"]
    cell = plan_cells(scaled)[0]
    assert cell_hash(scaled, cell) != cell_hash(parse_config(unscaled), cell)
    raw["fit"].update(random_starts=0)
    with pytest.raises(ValueError, match=r"'fit.random_scale': 2.0 is set but fit.random_starts is 0"):
        parse_config(raw)
    raw["fit"].update(random_starts=1, random_scale=-1.0)
    with pytest.raises(ValueError, match=r"fit.random_scale.*-1.0"):
        parse_config(raw)


@pytest.mark.parametrize(("value", "match"), [
    ([0.1], "at least two"), ([0.1, 0.1], "distinct"), ([0.1, -0.01], r"\[1\].*-0.01"), (0.1, "must be a list")])
def test_bad_ladders_are_named(value, match):
    with pytest.raises(ValueError, match=match):
        _config(control_perturbations=value)


def test_the_ladder_adds_one_control_per_rung_at_the_largest_n():
    config = _config(control_perturbations=[0.1, 0.01])
    assert config.control_perturbations == {"perturb_0.01": 0.01, "perturb_0.1": 0.1}
    cells = plan_cells(config)
    rungs = [c for c in cells if c.control.startswith("perturb_")]
    assert len(cells) == 2 * 2 * 2 + len(rungs) and len(rungs) == 2 * 2
    assert {c.n for c in rungs} == {300}


def test_the_ladder_measures_how_the_control_level_depends_on_the_start(tmp_path):
    config = _config(control_perturbations=[0.01, 0.1])
    out = run_sweep(config, tmp_path, progress=False, log=lambda _: None)
    rates = out.rates.set_index("series")
    # the non-shared class stops on an exact flat direction at a distance set by the start (~p^2);
    # the shared class reaches round-off whatever the start, and round-off levels carry no exponent
    assert 1.5 < rates.loc["nonshared", "control_perturb_exponent"] < 2.5
    assert np.isnan(rates.loc["shared", "control_perturb_exponent"])
    assert rates.loc["shared", "control_perturb_levels"].count(":") == 2
    assert rates.loc["nonshared", "control_perturb_levels"].startswith("0.01: ")
    ladder = out.results[out.results["control"].str.startswith("perturb_")]
    assert set(ladder["n"]) == {300} and (ladder["n_starts"] == 1).all()
    assert np.isfinite(out.summary["D1_median"]).all()
