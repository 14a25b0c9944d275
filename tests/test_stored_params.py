"""Stored parameter vectors give back the stored losses, and where D1 comes from (hand cases and a sweep)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from hmoe_sim.estimators import Bounds
from hmoe_sim.losses import atoms_at_box, d1_sources, d1_sources_for, l2_error, voronoi_loss, voronoi_losses_for
from hmoe_sim.models.presets import make_preset
from hmoe_sim.sweep import RunDir, parse_config, run_sweep
from hmoe_sim.sweep.cells import l2_seed
from hmoe_sim.sweep.stored import D1_SOURCE_COLUMNS, d1_sources_table, recompute_losses, stored_params
from hmoe_sim.sweep.tables import derived_tables

RUN = {
    "name": "stored",
    "root_seed": 7,
    "truth": {"preset": "hmoe-shared", "seed": 0, "options": {"expert_std": 1.0, "gate_slope_std": 1.0}},
    "sample": {"sizes": [60, 120], "replications": 2, "chunk": 2, "controls": ["noise_free"],
               "noise_levels": [0.3, 0.03]},
    "fit": {"method": "lm", "max_iter": 5, "n_starts": 1, "random_starts": 1},
    "series": [{"name": "shared", "structure": "shared"}, {"name": "nonshared", "structure": "nonshared"}],
    "losses": {"l2_n_eval": 300},
}


def quiet(msg: str) -> None:
    """Swallow the runner's log lines."""


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, pd.DataFrame, object]:
    config = parse_config(RUN)
    path = tmp_path_factory.mktemp("stored")
    out = run_sweep(config, path, progress=False, log=quiet)
    return config, out.results, path


# ---------------------------------------------------------------------------------------- hand cases
def test_d1_sources_split_a_hand_case():
    """Truth w* = (1, 0.5) at 0 and 1 (R^1); fitted atoms 0.1 (w 0.6), -0.2 (w 0.3), 10 (w 0.2, at the box).

    Cells: {0.1, -0.2} -> atom 0 (multi-atom: squared distances), {10} -> atom 1 (singleton: distance 9).
    location = 0.6 * 0.01 + 0.3 * 0.04 = 0.018; box = 0.2 * 9 = 1.8; mass = |0.9 - 1| + |0.2 - 0.5| = 0.4.
    """
    w, atoms = np.array([0.6, 0.3, 0.2]), np.array([[0.1], [-0.2], [10.0]])
    tw, tatoms = np.array([1.0, 0.5]), np.array([[0.0], [1.0]])
    parts = d1_sources(w, atoms, tw, tatoms, np.array([False, False, True]))
    assert parts["location"] == pytest.approx(0.018, abs=1e-15)
    assert parts["box"] == pytest.approx(1.8, abs=1e-15)
    assert parts["mass"] == pytest.approx(0.4, abs=1e-15)
    assert parts["D1"] == pytest.approx(2.218, abs=1e-14)
    assert parts["D1"] == pytest.approx(voronoi_loss(w, atoms, tw, tatoms, kind="D1"), abs=0)
    # an atom at the box in a multi-atom cell keeps its squared distance
    moved = d1_sources(w, atoms, tw, tatoms, np.array([True, False, False]))
    assert (moved["box"], moved["location"]) == (pytest.approx(0.006, abs=1e-15), pytest.approx(1.812, abs=1e-15))
    # torch in, torch out, batched
    batch = d1_sources(torch.tensor(np.stack([w, w])), torch.tensor(np.stack([atoms, atoms])), torch.tensor(tw),
                       torch.tensor(tatoms), torch.tensor([[False, False, True], [True, False, False]]))
    assert torch.allclose(batch["box"], torch.tensor([1.8, 0.006], dtype=torch.float64), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="at_box has shape"):
        d1_sources(w, atoms, tw, tatoms, np.array([True, False]))


def test_atoms_at_box_are_the_atoms_whose_own_parameters_reach_it():
    box = Bounds()
    shared = make_preset("hmoe-shared", seed=0).fit_model  # 2 heads x 2 adapters
    assert (shared.n_heads, shared.n_adapters, shared.structure) == (2, 2, "shared")
    free = shared.with_structure("nonshared")
    p = {k: torch.zeros(2, *s, dtype=torch.float64) for k, s in free.param_shapes().items()}
    p["a"][0, 0, 1, 2] = 10.0  # fit 0: head 0, adapter 1 -> atom 1
    p["beta0"][1, 1, 0] = -10.0  # fit 1: head 1, adapter 0 -> atom 2 (switched off: at the box too)
    p["b"][1, 1, 1] = 9.9  # inside the box
    assert atoms_at_box(free, p, box).tolist() == [[False, True, False, False], [False, False, True, False]]
    q = {k: torch.zeros(*s, dtype=torch.float64) for k, s in shared.param_shapes().items()}
    q["W1"][0, 0] = 10.0  # shared by every atom: no atom of its own
    assert not atoms_at_box(shared, q, box).any()
    q["z"][1, 1, 0] = -10.0
    assert atoms_at_box(shared, q, box).tolist() == [False, False, False, True]


def test_d1_sources_for_adds_up_to_d1_on_model_parameters():
    setup = make_preset("hmoe-shared", seed=0)
    model = setup.fit_model.with_structure("nonshared")
    truth_model, truth = setup.true_model.with_structure("nonshared"), setup.true_model.to_nonshared(setup.truth)
    gen = torch.Generator().manual_seed(0)
    params = {k: 3 * torch.randn(4, *s, generator=gen, dtype=torch.float64) for k, s in model.param_shapes().items()}
    params["a"][2, 0, 0, 0] = 10.0
    parts = d1_sources_for(model, params, truth_model, truth, Bounds())
    d1 = voronoi_losses_for(model, params, truth_model, truth, kinds=["D1"])["D1"]
    assert torch.allclose(parts["mass"] + parts["location"] + parts["box"], d1, rtol=1e-14, atol=0)
    assert parts["box"][2] > 0 and (parts["box"][[0, 1, 3]] == 0).all()


# ---------------------------------------------------------------------------------------- a sweep
def test_stored_parameters_reproduce_the_stored_losses(run):
    """Each fit's stored vector, scored with hmoe_sim.losses against the truth rebuilt from the config."""
    config, results, _ = run
    assert results["params"].map(len).nunique() == 2  # one length per fitted structure
    for (truth, name), part in results.groupby(["truth", "series"]):
        series = config.series_named(name)
        preset = make_preset(series.preset, seed=int(truth), **series.truth_options)
        model = preset.fit_model.with_structure(series.structure)
        truth_model = preset.true_model.with_structure(series.structure)
        true_params = preset.truth if series.structure == "shared" else preset.true_model.to_nonshared(preset.truth)
        theta = torch.tensor(np.stack(part["params"].to_list()), dtype=torch.float64)
        params = model.unflatten(theta)
        voronoi = voronoi_losses_for(model, params, truth_model, true_params, kinds=["D1", "D2"], r=1)
        l2 = l2_error(model, params, true_params, true_model=truth_model, n_eval=config.losses.l2_n_eval,
                      seed=l2_seed(config.root_seed), x_dist=config.sample.x_dist)
        for loss, values in (("D1", voronoi["D1"]), ("D2", voronoi["D2"]), ("L2", l2)):
            assert np.allclose(values.numpy(), part[loss].to_numpy(dtype=float), rtol=1e-12, atol=0), (name, loss)
    again = recompute_losses(config, results)
    for loss in ("D1", "D2", "L2"):
        assert np.allclose(again[loss].to_numpy(dtype=float), results[loss].to_numpy(dtype=float), rtol=1e-12,
                           atol=0)


def test_parameters_survive_results_parquet_and_report(run):
    config, results, path = run
    stored = RunDir(path).read_checked()[1]
    assert all(np.array_equal(a, b) for a, b in zip(stored["params"], results["params"], strict=True))
    assert pq.read_schema(path / "results.parquet").field("params").type.value_type.bit_width == 64


def test_d1_sources_table_of_a_sweep(run):
    config, results, path = run
    table = d1_sources_table(config, results)
    assert list(table.columns) == D1_SOURCE_COLUMNS
    assert sorted(table["end"].unique()) == ["largest_n_eff", "noise_free", "smallest_n_eff"]
    noisy = results[results["control"] == ""]
    for row in table.itertuples():
        assert row.mass_share + row.location_share + row.box_share == pytest.approx(1.0, rel=1e-12)
        if row.end != "noise_free":
            target = noisy["n_eff"].min() if row.end == "smallest_n_eff" else noisy["n_eff"].max()
            assert row.n_eff == target
            at = noisy[(noisy["series"] == row.series) & (noisy["n_eff"] == target)]
            assert row.D1_mean == pytest.approx(at["D1"].mean(), rel=1e-12)
        else:
            assert (row.noise_std, row.n) == (0.0, 120)
    written = pd.read_csv(path / "d1_sources.csv")
    assert list(written.columns) == [*D1_SOURCE_COLUMNS, "fingerprint"]
    assert np.allclose(written["box_share"], table["box_share"], rtol=1e-5)


def test_results_without_parameters_are_refused_in_one_line(run):
    config, results, _ = run
    old = results.drop(columns="params")
    with pytest.raises(ValueError, match="no parameter vectors") as err:
        stored_params(config, old[(old["series"] == "shared")])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="one \\(truth, series\\)"):
        stored_params(config, results)


def test_old_results_without_parameters_still_report(run):
    """Results from before parameters were stored: every other table is derived, d1_sources.csv is not."""
    config, results, _ = run
    tables = derived_tables(results.drop(columns="params"), config)
    assert "d1_sources.csv" not in tables and "rates.csv" in tables and "summary.csv" in tables


def test_d1_sources_table_counts_atoms_at_the_box_and_points_without_usable_fits(run):
    config, results, _ = run
    edited = results.copy()
    noisy = edited[(edited["control"] == "") & (edited["series"] == "nonshared")]
    largest = noisy[noisy["n_eff"] == noisy["n_eff"].max()].index
    setup, params = stored_params(config, edited.loc[largest[:1]])
    params["a"][0, 0, 1, 0] = 10.0  # one atom of one fit at the box
    theta = setup.fit_model.flatten(params)[0].numpy()
    edited["params"] = [theta if i == largest[0] else v for i, v in zip(edited.index, edited["params"], strict=True)]
    smallest = noisy[noisy["n_eff"] == noisy["n_eff"].min()].index
    edited.loc[smallest, "D1"] = np.nan  # no usable fit at the smallest n_eff
    table = d1_sources_table(config, edited).set_index(["series", "end"])
    row = table.loc[("nonshared", "largest_n_eff")]
    assert (row.n_fits_at_box, row.n_atoms_at_box) == (1, 1) and row.box_share > 0
    assert row.mass_share + row.location_share + row.box_share == pytest.approx(1.0, rel=1e-12)
    empty = table.loc[("nonshared", "smallest_n_eff")]
    assert empty.n_fits == 0 and np.isnan(empty.box_share) and empty.n_eff == noisy["n_eff"].min()
    assert table.loc[("shared", "largest_n_eff")].n_fits_at_box == 0
