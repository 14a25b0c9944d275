"""Sweep configuration, cell plan, seeds and atomic storage (no fitting involved)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hmoe_sim.data import cell_seed
from hmoe_sim.sweep.cells import cell_hash, data_seeds, plan_cells, start_seeds
from hmoe_sim.sweep.config import load_config, parse_config
from hmoe_sim.sweep.storage import RunDir, atomic_write

BASE = {
    "name": "tiny",
    "truth": {"preset": "hmoe-shared", "seed": 3},
    "sample": {"sizes": [200, 400], "replications": 3, "chunk": 2},
    "series": [{"name": "shared", "structure": "shared"}, {"name": "nonshared", "structure": "nonshared"}],
}


def with_change(path: str, value: object) -> dict:
    raw = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = raw
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    node[last] = value
    return raw


def test_defaults_are_filled_in_and_round_trip():
    cfg = parse_config(BASE)
    d = cfg.to_dict()
    assert d["root_seed"] == 0 and d["device"] == "cpu" and d["dtype"] == "float64"
    assert d["sample"] == {"sizes": [200, 400], "replications": 3, "chunk": 2, "x_dist": "uniform", "controls": []}
    assert d["truth"]["seeds"] == [3] and d["allow_nonidentifiable"] is False
    assert d["series"][0]["fit"]["random_starts"] == 0 and d["series"][0]["fit"]["near_optimal_loglik"] == 0.5
    assert d["series"][0]["truth_seeds"] == [3]
    assert d["losses"] == {"kinds": ["D1", "D2"], "r": 1, "l2": True, "l2_n_eval": 10000}
    assert d["series"][0]["fit"]["method"] == "lm" and d["series"][1]["preset"] == "hmoe-shared"
    again = parse_config(json.loads(json.dumps(d)))
    assert again.to_dict() == d and again.fingerprint == cfg.fingerprint


def test_fingerprint_changes_with_anything_that_changes_numbers():
    fp = parse_config(BASE).fingerprint
    assert parse_config(with_change("root_seed", 1)).fingerprint != fp
    assert parse_config(with_change("truth.options", {"noise_std": 0.2})).fingerprint != fp
    assert parse_config(with_change("series.0.fit", {"max_iter": 5})).fingerprint != fp
    assert parse_config(BASE).with_overrides(dtype="float32").fingerprint != fp


def test_log_grid():
    cfg = parse_config(with_change("sample", {"grid": {"min": 100, "max": 10000, "points": 3}, "replications": 2}))
    assert cfg.sizes == [100, 1000, 10000]


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        ("bogus", 1, "bogus"),
        ("sample.bogus", 1, "sample.bogus"),
        ("sample.sizes", [0, 100], "sample.sizes[0]"),
        ("sample.sizes", [-5, 100], "sample.sizes[0]"),
        ("sample.replications", 1, "sample.replications"),
        ("truth.preset", "no-such-preset", "truth.preset"),
        ("truth.options", {"gate_slope_stdd": 1.0}, "gate_slope_stdd"),
        ("series.1.fit", {"init": "anywhere"}, "series[1].fit.init"),
        ("series.1.structure", "both", "series[1].structure"),
        ("losses.kinds", ["D3"], "losses.kinds[0]"),
        ("dtype", "float16", "dtype"),
        ("truth.options", {"n_fit": 0}, "series[0].truth_options"),
    ],
)
def test_bad_configs_name_the_key(path, value, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        parse_config(with_change(path, value))


def test_duplicate_series_and_missing_pieces():
    raw = with_change("series", [{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="distinct"):
        parse_config(raw)
    with pytest.raises(ValueError, match="series"):
        parse_config({k: v for k, v in BASE.items() if k != "series"})
    with pytest.raises(ValueError, match="sample.sizes"):
        parse_config(with_change("sample", {"replications": 2}))


def test_load_config_reads_toml(tmp_path: Path):
    f = tmp_path / "mine.toml"
    f.write_text('[truth]\npreset = "sigmoid-regime1"\n[sample]\nsizes = [100, 200]\nreplications = 2\n'
                 '[[series]]\nname = "linear/converged"\n')
    cfg = load_config(f)
    assert cfg.name == "mine" and cfg.series[0].preset == "sigmoid-regime1"
    f.write_text("[truth\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(f)


def test_plan_covers_every_replication_once():
    cfg = parse_config(BASE)
    cells = plan_cells(cfg)
    assert len(cells) == 2 * 2 * 2
    for s in ("shared", "nonshared"):
        for n in (200, 400):
            reps = sorted(r for c in cells if c.series == s and c.n == n for r in c.reps)
            assert reps == [0, 1, 2]
    assert len({c.key for c in cells}) == len(cells)


def test_seeds_depend_only_on_coordinates():
    a = [s.generate_state(2).tolist() for s in data_seeds(7, 1, 100, (0, 1))]
    b = [cell_seed(7, "data", 1, 100, r).generate_state(2).tolist() for r in (0, 1)]
    assert a == b and a[0] != a[1]
    assert data_seeds(7, 2, 100, (0,))[0].generate_state(2).tolist() != a[0]  # another truth, other data
    starts = start_seeds(7, 1, 100, (0, 1, 2), 3)
    assert len(starts) == 3 and all(len(row) == 3 for row in starts)
    assert len({s for row in starts for s in row}) == 9  # every (replication, start) has its own seed
    assert start_seeds(7, 1, 100, (2,), 3) == [starts[2]]  # independent of which cell holds the replication
    assert all(0 <= s < 2**63 for row in starts for s in row)


def test_plan_blocks_are_fixed_so_adding_replications_keeps_cells():
    small = plan_cells(parse_config(with_change("sample.replications", 3)))
    large = plan_cells(parse_config(with_change("sample.replications", 5)))
    assert {c for c in small if len(c.reps) == 2} <= set(large)  # the full block [0, 1] is the same cell
    assert max(len(c.reps) for c in large) == 2  # chunk = 2 is never shrunk to the replication count


def test_truth_ensemble_and_controls_in_the_plan():
    raw = with_change("truth", {"preset": "hmoe-shared", "seeds": [1, 2, 3]})
    raw["sample"]["controls"] = ["noise_free"]
    raw["series"][1]["truth_seeds"] = [2]
    cells = plan_cells(parse_config(raw))
    shared = {(c.truth, c.control) for c in cells if c.series == "shared"}
    assert shared == {(t, k) for t in (1, 2, 3) for k in ("", "noise_free")}
    assert {c.truth for c in cells if c.series == "nonshared"} == {2}
    assert len({c.key for c in cells}) == len(cells)


@pytest.mark.parametrize(("change", "key"), [
    (("truth.seeds", [1, 1]), "truth.seeds"),
    (("truth.seeds", []), "truth.seeds"),
    (("sample.controls", ["bootstrap"]), "sample.controls[0]"),
    (("sample.controls", "noise_free"), "sample.controls"),
    (("fit", {"n_starts": 0}), "fit.n_starts"),
    (("fit", {"random_starts": -1}), "fit.random_starts"),
    (("fit", {"near_optimal_loglik": -0.1}), "fit.near_optimal_loglik"),
    (("series.1.truth_seeds", [9]), "series[1].truth_seeds"),
    (("allow_nonidentifiable", "yes"), "allow_nonidentifiable"),
])
def test_new_keys_are_validated_before_any_fit(change: tuple[str, object], key: str):
    with pytest.raises(ValueError, match=key.replace("[", r"\[").replace("]", r"\]")):
        parse_config(with_change(*change))


def test_seed_and_seeds_are_exclusive():
    with pytest.raises(ValueError, match="truth.seeds"):
        parse_config(with_change("truth", {"preset": "hmoe-shared", "seed": 1, "seeds": [1, 2]}))


def test_atomic_write_leaves_no_partial_file(tmp_path: Path):
    target = tmp_path / "x.txt"

    def broken(f) -> None:
        f.write(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    atomic_write(target, lambda f: f.write(b"whole"))
    assert target.read_text() == "whole"


def test_run_dir_cells_and_config(tmp_path: Path):
    cfg = parse_config(BASE)
    run = RunDir(tmp_path / "run")
    run.write_config(cfg)
    assert run.read_config().fingerprint == cfg.fingerprint == run.stored_fingerprint()
    cells = plan_cells(cfg)[:2]
    losses = ["D1", "D2", "L2"]
    for i, c in enumerate(cells):
        h = cell_hash(cfg, c)
        assert not run.has_cell(c, h)
        frame = pd.DataFrame({"truth": c.truth, "series": c.series, "control": c.control, "n": c.n,
                              "replication": list(c.reps),
                              "x": np.arange(len(c.reps)) + i, **{k: 0.5 for k in losses}})
        run.write_cell(c, h, frame, cfg.fingerprint)
        assert run.has_cell(c, h)
        pd.testing.assert_frame_equal(run.load_cell(c, h, losses), frame)
    assert not run.has_cell(cells[0], "0" * 16)
    with pytest.raises(FileNotFoundError):
        run.load_cell(cells[0], "0" * 16, losses)
    with pytest.raises(ValueError, match="not a sweep directory"):
        RunDir(tmp_path / "empty").read_config()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "experiments" / "configs").rglob("*.toml")),
                         ids=lambda p: p.stem)
def test_committed_configs_are_valid(path: Path):
    from hmoe_sim.sweep.checks import check_estimator_options

    config = load_config(path)
    check_estimator_options(config)
    assert config.name == path.stem and len(config.sizes) >= 2
