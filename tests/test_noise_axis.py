"""The noise axis of a sweep (``sample.noise_levels``): validation, the plan, pairing, controls, columns."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

import hmoe_sim.sweep.cell as cell_module
from hmoe_sim.data import as_generator, draw_inputs
from hmoe_sim.sweep import RunDir, parse_config, plan_cells, run_sweep
from hmoe_sim.sweep.cell import run_cell
from hmoe_sim.sweep.cells import cell_hash, data_seeds
from hmoe_sim.sweep.schema import MAX_FITS
from hmoe_sim.sweep.setup import series_setup

AXIS = {
    "name": "axis",
    "root_seed": 5,
    "truth": {"preset": "hmoe-shared", "seed": 0, "options": {"expert_std": 1.0, "gate_slope_std": 1.0}},
    "sample": {"sizes": [60, 120], "replications": 2, "chunk": 2, "controls": ["noise_free"],
               "noise_levels": [0.1, 0.01]},
    "fit": {"method": "lm", "max_iter": 3},
    "series": [{"name": "shared", "structure": "shared"}],
    "losses": {"l2_n_eval": 300},
}


def axis(**sample: object) -> dict:
    raw = copy.deepcopy(AXIS)
    raw["sample"].update(sample)
    return raw


def without_axis() -> dict:
    raw = copy.deepcopy(AXIS)
    del raw["sample"]["noise_levels"]
    return raw


def quiet(msg: str) -> None:
    """Swallow the runner's log lines."""


@pytest.mark.parametrize("value, key, shown", [
    (0.1, "sample.noise_levels", "must be a non-empty list of noise standard deviations > 0 (e.g. [0.05, 0.005]), "
                                 "got 0.1"),
    ([], "sample.noise_levels", "got []"),
    ([0.1, 0.0], "sample.noise_levels[1]", "positive number, got 0.0"),
    ([-0.05], "sample.noise_levels[0]", "positive number, got -0.05"),
    ([0.1, math.inf], "sample.noise_levels[1]", "got inf"),
    ([math.nan], "sample.noise_levels[0]", "got nan"),
    (["0.1"], "sample.noise_levels[0]", "must be a number, got '0.1'"),
    ([True], "sample.noise_levels[0]", "must be a number, got True"),
    ([0.1, 0.01, 0.1], "sample.noise_levels", "must be distinct, got [0.1, 0.01, 0.1] (0.1 repeated)"),
])
def test_bad_noise_levels_are_refused_in_one_line(value: object, key: str, shown: str):
    with pytest.raises(ValueError) as err:
        parse_config(axis(noise_levels=value))
    message = str(err.value)
    assert message.startswith(f"config key {key!r}: ") and shown in message and "\n" not in message


@pytest.mark.parametrize("where", ["truth", "series"])
def test_noise_axis_beside_a_noise_std_option_is_refused(where: str):
    raw = axis()
    if where == "truth":
        raw["truth"]["options"]["noise_std"] = 0.05
        key = "truth.options.noise_std"
    else:
        raw["series"][0]["truth_options"] = {"noise_std": 0.05}
        key = "series[0].truth_options.noise_std"
    with pytest.raises(ValueError, match=key.replace(".", r"\.").replace("[", r"\[").replace("]", r"\]")) as err:
        parse_config(raw)
    assert "0.05" in str(err.value) and "\n" not in str(err.value)
    raw["sample"].pop("noise_levels")
    parse_config(raw)  # without the axis the option is the data's noise, as before


def test_resolved_configuration_records_the_axis_only_when_set():
    config = parse_config(axis(noise_levels=[0.01, 0.1, 0.001]))
    assert config.noise_levels == [0.001, 0.01, 0.1]  # sorted, like the sizes
    assert config.to_dict()["sample"]["noise_levels"] == [0.001, 0.01, 0.1]
    assert parse_config(config.to_dict()).fingerprint == config.fingerprint
    plain = parse_config(without_axis())
    assert "noise_levels" not in plain.to_dict()["sample"] and plain.noise_levels == []
    assert plain.fingerprint != config.fingerprint


def test_plan_crosses_levels_with_sizes_and_fits_each_control_once():
    config = parse_config(axis())
    cells = plan_cells(config)
    noisy = [c for c in cells if c.control == ""]
    controls = [c for c in cells if c.control]
    assert sorted((c.n, c.sigma) for c in noisy) == [(60, 0.01), (60, 0.1), (120, 0.01), (120, 0.1)]
    assert sorted(c.n for c in controls) == [60, 120] and all(c.sigma is None for c in controls)
    assert len({c.key for c in cells}) == len(cells)
    # a control's numbers do not depend on the noise levels: it is the cell of the run without the axis
    plain = parse_config(without_axis())
    plain_controls = {c.key: cell_hash(plain, c) for c in plan_cells(plain) if c.control}
    assert {c.key: cell_hash(config, c) for c in controls} == plain_controls
    # a noisy cell of the axis is another cell than the run's without it (its sigma is in key and hash)
    plain_noisy = {c.key for c in plan_cells(plain) if not c.control}
    assert plain_noisy.isdisjoint(c.key for c in noisy)


def test_plan_size_check_counts_the_noise_levels():
    reps = MAX_FITS // 4 + 1  # 2 sizes x (1 + 0 controls): about half the limit without the axis
    parse_config(axis(replications=reps, controls=[], noise_levels=[0.1]))
    with pytest.raises(ValueError, match="sample.replications.*noise levels"):
        parse_config(axis(replications=reps, controls=[], noise_levels=[0.1, 0.01]))


def test_noise_ladder_is_paired(monkeypatch: pytest.MonkeyPatch):
    """At every noise level a replication has the same X and eps: y - f*(X) = sigma * eps, eps from the data seed."""
    config = parse_config(axis(noise_levels=[0.1, 0.01, 0.001]))
    drawn: dict[float | None, tuple[torch.Tensor, torch.Tensor]] = {}
    real = cell_module.sample_batch

    def recording(model, truth, n, noise_std, seeds, **kwargs):  # noqa: ANN001, ANN202
        X, y = real(model, truth, n, noise_std, seeds, **kwargs)
        drawn[noise_std] = (X.clone(), y.clone())
        return X, y

    monkeypatch.setattr(cell_module, "sample_batch", recording)
    cells = [c for c in plan_cells(config) if c.n == 60]
    for c in cells:
        run_cell(config.to_dict(), c)
    assert sorted(drawn) == [0.0, 0.001, 0.01, 0.1]  # the control's data are the noise-free ones
    setup = series_setup(config, config.series[0])
    X0 = drawn[0.0][0]
    f = torch.stack([setup.data_model.predict(setup.data_truth, x) for x in X0])
    assert torch.equal(drawn[0.0][1], f)  # the control: f*(X) exactly
    # eps recomputed from the data seeds, independently of the sampler: the inputs first, then n normals
    seeds = data_seeds(config.root_seed, 0, 60, (0, 1))
    eps = []
    for r, seed in enumerate(seeds):
        rng = as_generator(seed)
        x = draw_inputs(rng, 60, setup.data_model.input_dim, config.sample.x_dist)
        assert np.array_equal(x, X0[r].numpy())
        eps.append(torch.from_numpy(rng.standard_normal(60)))
    eps_t = torch.stack(eps)
    ulp = torch.finfo(torch.float64).eps
    for sigma in (0.1, 0.01, 0.001):
        X, y = drawn[sigma]
        assert torch.equal(X, X0)  # the same inputs at every level, bit for bit
        scale = (f.abs() + (sigma * eps_t).abs()).max().item()
        assert torch.allclose(y - f, sigma * eps_t, rtol=0.0, atol=4 * ulp * scale)
    # and y - f scales with sigma between levels (the same eps)
    r1, r2 = drawn[0.1][1] - f, drawn[0.001][1] - f
    assert torch.allclose(r2 * 100.0, r1, rtol=0.0, atol=400 * ulp * (f.abs().max().item() + 1))


def test_results_carry_noise_std_and_n_eff_with_controls_once(tmp_path):
    config = parse_config(axis())
    out = run_sweep(config, tmp_path / "run", progress=False, log=quiet)
    results = out.results
    assert list(results.columns[:7]) == ["fingerprint", "truth", "series", "structure", "control", "n", "noise_std"]
    assert results.columns[7] == "n_eff"
    noisy, control = results[results["control"] == ""], results[results["control"] == "noise_free"]
    assert len(noisy) == 2 * 2 * 2 and len(control) == 2 * 2  # sizes x levels x reps; sizes x reps
    assert sorted(set(noisy["noise_std"])) == [0.01, 0.1]
    assert np.array_equal(noisy["n_eff"].to_numpy(), noisy["n"].to_numpy() / noisy["noise_std"].to_numpy() ** 2)
    assert (control["noise_std"] == 0.0).all() and np.isinf(control["n_eff"]).all()
    assert not results.duplicated(["truth", "series", "control", "n", "noise_std", "replication"]).any()
    # paired: the same data seed at every level
    seeds = noisy.groupby(["n", "replication"])["data_seed"].nunique()
    assert (seeds == 1).all()
    # the stored results pass the plan check, and a rerun reuses every cell
    _, checked = RunDir(tmp_path / "run").read_checked()
    pd.testing.assert_frame_equal(checked, pd.read_parquet(tmp_path / "run" / "results.parquet"))
    again = run_sweep(config, tmp_path / "run", progress=False, log=quiet)
    assert (again.reused, again.computed) == (out.n_cells, 0)
    pd.testing.assert_frame_equal(again.results, results)


def test_a_run_without_the_axis_records_the_truths_noise(tmp_path):
    config = parse_config(without_axis())
    results = run_sweep(config, tmp_path / "run", progress=False, log=quiet).results
    sigma = series_setup(config, config.series[0]).noise_std
    noisy = results[results["control"] == ""]
    assert sigma > 0 and (noisy["noise_std"] == sigma).all()
    assert np.allclose(noisy["n_eff"], noisy["n"] / sigma**2, rtol=1e-15, atol=0)
    assert (results.loc[results["control"] != "", "noise_std"] == 0.0).all()


def test_older_cells_without_the_columns_are_reused_and_filled_in(tmp_path):
    """Cells written before the noise columns existed are reused; the columns follow from the configuration."""
    import pyarrow.parquet as pq

    config = parse_config(without_axis())
    first = run_sweep(config, tmp_path / "run", progress=False, log=quiet).results
    for path in (tmp_path / "run" / "cells").glob("*.parquet"):
        table = pq.read_table(path)
        old = table.drop_columns(["noise_std", "n_eff"])
        pq.write_table(old.replace_schema_metadata(table.schema.metadata), path)
    again = run_sweep(config, tmp_path / "run", progress=False, log=quiet)
    assert again.computed == 0
    pd.testing.assert_frame_equal(again.results, first)


def test_a_cell_file_of_another_noise_level_is_refused(tmp_path):
    config = parse_config(axis())
    cell = next(c for c in plan_cells(config) if c.sigma == 0.1)
    frame = run_cell(config.to_dict(), cell)
    run = RunDir(tmp_path)
    h = cell_hash(config, cell)
    run.write_cell(cell, h, frame.assign(noise_std=0.01), config.fingerprint)
    with pytest.raises(ValueError, match="noise level 0.1"):
        run.load_cell(cell, h, config.losses.columns)
