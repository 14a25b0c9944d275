"""The evidence behind a rate: start independence, identification spread, noise-free controls, verdicts,
and the truth-ensemble tables."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from roundoff import assert_frames_match

from hmoe_sim.data import sample_batch
from hmoe_sim.estimators import fit_batch, init_near_truth
from hmoe_sim.models.presets import make_preset
from hmoe_sim.sweep import parse_config, run_sweep
from hmoe_sim.sweep.cell import near_optimal
from hmoe_sim.sweep.ensemble import ensemble_table, per_truth_table
from hmoe_sim.sweep.report import rates_table

SMALL = {
    "name": "diag",
    "root_seed": 5,
    "truth": {"preset": "hmoe-shared", "seeds": [1, 2], "options": {"expert_std": 1.0, "gate_slope_std": 1.0}},
    "sample": {"sizes": [80, 160], "replications": 3, "chunk": 1, "controls": ["noise_free"]},
    "fit": {"method": "lm", "max_iter": 6, "n_starts": 2, "random_starts": 1},
    "series": [{"name": "shared", "structure": "shared"}, {"name": "nonshared", "structure": "nonshared"}],
    "losses": {"l2_n_eval": 400},
}


def quiet(msg: str) -> None:
    """Swallow the runner's log lines."""


def _run(tmp: Path, **sample: object) -> pd.DataFrame:
    raw = copy.deepcopy(SMALL)
    raw["sample"].update(sample)
    return run_sweep(parse_config(raw), tmp, progress=False, log=quiet).results


def test_results_do_not_depend_on_how_work_is_cut(tmp_path: Path):
    a = _run(tmp_path / "c1", chunk=1)
    b = _run(tmp_path / "c3", chunk=3)
    assert len(a) == len(b) == 2 * 2 * 2 * 2 * 3  # truths x series x (series, control) x sizes x replications
    keep = [c for c in a.columns if c not in ("fingerprint", "chunk")]
    losses = [c for c in keep if c.split("_")[0] in ("D1", "D2", "L2")]
    assert {"D1_min", "D1_max", "L2_max", "risk", "grad_norm", "start", "n_near_optimal"} <= set(keep)
    # chunk 1 and chunk 3 fit other stack shapes: the same results to round-off (tests/roundoff.py)
    assert_frames_match(a[keep], b[keep])
    assert np.isfinite(a[losses].to_numpy(dtype=float)).all()


def test_series_and_their_controls_share_inputs_and_starts(tmp_path: Path):
    res = _run(tmp_path / "r")
    key = ["truth", "n", "replication"]
    seeds = res.groupby(key)["data_seed"].nunique()
    assert (seeds == 1).all()  # both structures and both controls use the same data seed per replication
    noisy = res[res["control"] == ""]
    control = res[res["control"] == "noise_free"]
    assert (control["risk_truth"] < 1e-25).all() and (noisy["risk_truth"] > 1e-4).all()
    # the estimate is the start of least risk, and always near-optimal
    assert ((res["n_near_optimal"] >= 1) & (res["n_near_optimal"] <= res["n_starts"])).all()
    assert (res["D1_min"] <= res["D1"]).all() and (res["D1"] <= res["D1_max"]).all()


def test_multistart_stack_equals_the_starts_run_one_by_one():
    setup = make_preset("softmax-linear", seed=0, input_dim=3)
    seeds = [np.random.SeedSequence(i) for i in range(2)]
    X, y = sample_batch(setup.true_model, setup.truth, 150, setup.noise_std, seeds)
    init = init_near_truth(setup.fit_model, setup.true_model, setup.truth, batch_shape=(2, 3), seed=4)
    stacked = fit_batch(setup.fit_model, X, y, init, max_iter=15)
    assert stacked.all_starts is not None and len(stacked.all_starts) == 6 and stacked.n_starts == 3
    for s in range(3):
        alone = fit_batch(setup.fit_model, X, y, {k: v[:, s] for k, v in init.items()}, max_iter=15)
        rows = [b * 3 + s for b in range(2)]
        torch.testing.assert_close(stacked.all_starts.risk[rows], alone.risk, rtol=1e-12, atol=0)
        for k in alone.params:
            torch.testing.assert_close(stacked.all_starts.params[k][rows], alone.params[k], rtol=1e-10, atol=1e-12)
    best = stacked.all_starts.risk.reshape(2, 3).argmin(-1)
    assert torch.equal(stacked.start, best)
    torch.testing.assert_close(stacked.risk, stacked.all_starts.risk.reshape(2, 3).min(-1).values)


def test_noise_free_control_of_an_exactly_specified_model_reaches_round_off():
    setup = make_preset("softmax-linear", seed=1, input_dim=3, n_true=2, n_fit=2, gate_slope_std=1.0,
                        expert_std=1.0)
    X, y = sample_batch(setup.true_model, setup.truth, 400, 0.0, [np.random.SeedSequence(3)])
    init = init_near_truth(setup.fit_model, setup.true_model, setup.truth, batch_shape=(1,), seed=2,
                           perturbation=0.05)
    result = fit_batch(setup.fit_model, X, y, init, max_iter=200, tol=1e-14)
    assert float(result.risk[0]) <= 1e-20


def test_near_optimal_margin_in_log_likelihood_units():
    risk = np.array([[1.0, 1.0 + 0.9 / 100, 1.0 + 1.1 / 100, np.nan]])
    # n = 100, margin 0.5: risk_s - risk_best <= (2 * 0.5 / 100) * risk_best = 0.01
    got = near_optimal(risk, np.array([1.0]), 100, 0.5, np.array([1.0]))
    assert got.tolist() == [[True, True, False, False]]
    # noise-free: risks at round-off are all near-optimal, a real misfit is not
    tiny = np.array([[1e-32, 1e-30, 1e-6]])
    assert near_optimal(tiny, np.array([1e-32]), 100, 0.5, np.array([1.0])).tolist() == [[True, True, False]]


SIZES = (100, 316, 1000, 3162, 10000)


def _fake_results(truths: list[int], slopes: dict[str, float], control_levels: dict[str, float]) -> pd.DataFrame:
    """Noise-free per-fit losses that follow C n^slope exactly (two replications per n)."""
    rows = []
    for t in truths:
        for series, slope in slopes.items():
            for control, level in (("", None), ("noise_free", control_levels[series])):
                for n in SIZES:
                    for r in range(2):
                        value = (1 + 0.01 * r) * (n / 100.0) ** slope if level is None else level
                        rows.append({"truth": t, "series": series, "control": control, "n": n, "replication": r,
                                     "D1": value, "D1_min": value, "D1_max": value * 1.01, "diverged": False,
                                     "on_boundary": False, "risk": 1.0, "risk_truth": 1.0, "converged": True,
                                     "start": 2 * r})
    return pd.DataFrame(rows)


def test_rates_and_ensemble_tables_on_a_constructed_ensemble():
    raw = copy.deepcopy(SMALL)
    raw["truth"]["seeds"] = [1, 2, 3]
    raw["sample"]["sizes"] = list(SIZES)
    raw["losses"] = {"kinds": ["D1"], "l2": False}
    config = parse_config(raw)
    stuck = _fake_results([1, 2, 3], {"shared": -0.5, "nonshared": -0.25}, {"shared": 1e-14, "nonshared": 1e-2})
    verdicts = rates_table(stuck, config, n_boot=200, floors={}).groupby("series")["verdict"].unique()
    # a control that stays at 1e-2 at every n: without noise the fit lands on a set
    assert verdicts.map(list).to_dict() == {"nonshared": ["set-valued"], "shared": ["rate"]}
    results = _fake_results([1, 2, 3], {"shared": -0.5, "nonshared": -0.25}, {"shared": 1e-14, "nonshared": 1e-15})
    rates = rates_table(results, config, n_boot=200, floors={})
    assert len(rates) == 6 and set(rates["verdict"]) == {"rate"}
    shared = rates[rates["series"] == "shared"]
    np.testing.assert_allclose(shared["slope"], -0.5, atol=1e-3)
    np.testing.assert_allclose(shared["control_level"], 1e-14)
    np.testing.assert_allclose(shared["spread_ratio"], 0.01, rtol=1e-6)
    per_truth = per_truth_table(rates, config)
    assert set(per_truth["H"]) == {2} and len(per_truth) == 6
    ens = ensemble_table(per_truth, config, n_boot=200)
    row = ens.iloc[0]
    assert (row["H"], row["n_truths"], row["n_both_rate"]) == (2, 3, 3)
    assert row["verdict_pairs"] == "rate/rate: 3"
    assert row["diff_median"] == pytest.approx(-0.25, abs=1e-3)
    assert row["n_shared_ci_below"] == 3
    # the kept start was a random one (index 2 >= n_starts) on one replication in two
    np.testing.assert_allclose(rates["best_random_fraction"], 0.5)
    assert (rates["converged_fraction"] == 1.0).all()
    assert rates["identifiable"].isna().all()  # no floors given: unknown, never a guess
    floors = {(t, s, "D1"): floor for t in (1, 2, 3) for s, floor in (("shared", 0.0), ("nonshared", 0.2))}
    with_floors = rates_table(results, config, n_boot=200, floors=floors)
    assert with_floors.set_index("series")["identifiable"].to_dict() == {"shared": True, "nonshared": False}
