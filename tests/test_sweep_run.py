"""Sweeps end to end: resume after a kill, bit-for-bit seeds, dask vs local, early config errors."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hmoe_sim.sweep.backends as backends
from hmoe_sim.sweep import parse_config, plan_cells, run_sweep
from hmoe_sim.sweep.cells import Cell
from hmoe_sim.sweep.setup import series_setup

TINY = {
    "name": "tiny",
    "root_seed": 11,
    "truth": {"preset": "hmoe-shared", "seed": 0, "options": {"expert_std": 1.0, "gate_slope_std": 1.0}},
    "sample": {"sizes": [60, 120], "replications": 2, "chunk": 1},
    "fit": {"method": "lm", "max_iter": 4},
    "series": [{"name": "shared", "structure": "shared"}, {"name": "nonshared", "structure": "nonshared"}],
    "losses": {"l2_n_eval": 500},
}


def tiny(**changes: object) -> dict:
    raw = copy.deepcopy(TINY)
    raw.update(changes)
    return raw


def quiet(msg: str) -> None:
    """Swallow the runner's log lines."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = run_sweep(parse_config(TINY), tmp_path_factory.mktemp("ref"), progress=False, log=quiet)
    assert (out.reused, out.computed, out.n_cells) == (0, 8, 8)
    return out.results


def test_results_table_has_one_row_per_fit(reference: pd.DataFrame):
    assert len(reference) == 2 * 2 * 2
    for col in ("fingerprint", "series", "structure", "n", "replication", "data_seed", "D1", "D2", "L2",
                "converged", "diverged", "on_boundary"):
        assert col in reference.columns, col
    assert reference["fingerprint"].nunique() == 1
    # paired design: both series see the same data sets
    by = reference.set_index(["series", "n", "replication"])["data_seed"]
    assert (by["shared"] == by["nonshared"]).all()
    assert np.isfinite(reference[["D1", "D2", "L2"]].to_numpy()).all()


def test_same_seed_is_bit_for_bit_and_other_seed_differs(tmp_path: Path, reference: pd.DataFrame):
    again = run_sweep(parse_config(TINY), tmp_path / "a", progress=False, log=quiet).results
    pd.testing.assert_frame_equal(again, reference, check_exact=True)
    other = run_sweep(parse_config(tiny(root_seed=12)), tmp_path / "b", progress=False, log=quiet).results
    assert not set(other["data_seed"]) & set(reference["data_seed"])
    assert not np.allclose(other["L2"].to_numpy(), reference["L2"].to_numpy())


def test_kill_and_resume(tmp_path: Path, reference: pd.DataFrame, monkeypatch: pytest.MonkeyPatch):
    real = backends.run_cell
    calls = {"n": 0}

    def dies_after_three(config_dict, cell):
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real(config_dict, cell)

    monkeypatch.setattr(backends, "run_cell", dies_after_three)
    cfg = parse_config(TINY)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, tmp_path, progress=False, log=quiet)
    assert calls["n"] == 3  # the patched function is the one the sweep called
    stored = list((tmp_path / "cells").iterdir())
    assert len(stored) == 3 and all(p.suffix == ".parquet" for p in stored)
    assert not (tmp_path / "results.parquet").exists()
    monkeypatch.setattr(backends, "run_cell", real)
    messages: list[str] = []
    resumed = run_sweep(cfg, tmp_path, progress=False, log=messages.append)
    assert (resumed.reused, resumed.computed) == (3, 5)
    assert "reusing 3" in messages[0]
    pd.testing.assert_frame_equal(resumed.results, reference, check_exact=True)
    # a rerun of a finished sweep computes nothing
    assert run_sweep(cfg, tmp_path, progress=False, log=quiet).computed == 0
    # a changed configuration never reuses the stale cells
    changed = run_sweep(parse_config(tiny(root_seed=5)), tmp_path, progress=False, log=quiet)
    assert (changed.reused, changed.computed) == (0, 8)
    assert changed.results["fingerprint"].iloc[0] != reference["fingerprint"].iloc[0]


def test_dask_backend_matches_local(tmp_path: Path, reference: pd.DataFrame):
    pytest.importorskip("dask.distributed")
    out = run_sweep(parse_config(TINY), tmp_path, backend="dask", jobs=2, dask_processes=False, progress=False,
                    log=quiet)
    pd.testing.assert_frame_equal(out.results, reference, check_exact=True)


def test_loky_processes_match_local(tmp_path: Path, reference: pd.DataFrame, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(backends, "usable_cores", lambda: 2)  # a pool of two workers on any machine
    out = run_sweep(parse_config(TINY), tmp_path, jobs=2, progress=False, log=quiet)
    pd.testing.assert_frame_equal(out.results, reference, check_exact=True)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (tiny(fit={"method": "lm", "options": {"bogus_option": 1}}), "fit.options.bogus_option"),
        (tiny(fit={"method": "lm", "bounds": {"limits": {"nope": [-1, 1]}}}), "fit.bounds"),
        (tiny(fit={"method": "lm", "bounds": {"lims": {}}}), "fit.bounds.lims"),
        (tiny(device="cuda:99"), "cuda:99"),
    ],
)
def test_estimator_settings_fail_before_fitting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raw, needle):
    def never(*args, **kwargs):
        raise AssertionError("a fit was started")

    monkeypatch.setattr(backends, "run_cell", never)
    with pytest.raises(ValueError, match=needle.replace(".", r"\.")):
        run_sweep(parse_config(raw), tmp_path, progress=False, log=quiet)
    assert not (tmp_path / "cells").exists()


def test_jobs_are_capped_at_the_usable_cores(monkeypatch: pytest.MonkeyPatch):
    assert backends.usable_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(backends, "usable_cores", lambda: 2)
    said: list[str] = []
    capped = backends.Execution(jobs=1000).capped(1, said.append)
    assert capped == backends.Execution(jobs=2)
    assert said == ["--jobs 1000 x 1 torch thread(s) per cell is more than the 2 usable cores; running 2 job(s) "
                    "at a time"]
    assert backends.Execution(jobs=3, backend="dask").capped(2, said.append) == backends.Execution(1, "dask")
    assert len(said) == 2 and "--jobs 3 x 2 torch thread(s)" in said[1]
    said.clear()
    for jobs, threads in ((2, 1), (1, 2), (1, 4)):  # within the cores, or a single job: left alone, no notice
        assert backends.Execution(jobs=jobs).capped(threads, said.append).jobs == jobs
    remote = backends.Execution(jobs=1000, backend="dask", scheduler="tcp://127.0.0.1:1")
    assert remote.capped(1, said.append) is remote  # a remote cluster brings its own cores
    assert not said


def test_jobs_beyond_the_cores_run_in_process(tmp_path: Path, reference: pd.DataFrame,
                                              monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(backends, "usable_cores", lambda: 1)
    real = backends.run_cell
    calls = {"n": 0}

    def counted(config_dict, cell):
        calls["n"] += 1
        return real(config_dict, cell)

    monkeypatch.setattr(backends, "run_cell", counted)
    messages: list[str] = []
    out = run_sweep(parse_config(TINY), tmp_path, jobs=1000, progress=False, log=messages.append)
    assert calls["n"] == 8  # every cell in this process: no worker was started
    assert [m for m in messages if "usable cores" in m] == [
        "--jobs 1000 x 1 torch thread(s) per cell is more than the 1 usable cores; running 1 job(s) at a time"]
    pd.testing.assert_frame_equal(out.results, reference, check_exact=True)


def test_bad_runner_arguments(tmp_path: Path):
    cfg = parse_config(TINY)
    with pytest.raises(ValueError, match="backend"):
        run_sweep(cfg, tmp_path, backend="spark", log=quiet)
    with pytest.raises(ValueError, match="jobs"):
        run_sweep(cfg, tmp_path, jobs=0, log=quiet)
    with pytest.raises(ValueError, match="scheduler"):
        run_sweep(cfg, tmp_path, scheduler="tcp://127.0.0.1:1", log=quiet)


def test_nonshared_series_is_scored_on_the_shared_truths_atoms():
    cfg = parse_config(TINY)
    shared = series_setup(cfg, cfg.series[0])
    nonshared = series_setup(cfg, cfg.series[1])
    a = shared.score_model.mixing_measure(shared.score_truth)
    b = nonshared.score_model.mixing_measure(nonshared.score_truth)
    assert nonshared.fit_model.structure == "nonshared" and shared.fit_model.structure == "shared"
    assert np.array_equal(a.atoms.numpy(), b.atoms.numpy()) and np.array_equal(a.weights.numpy(), b.weights.numpy())
    assert len(plan_cells(cfg)) == 8



def test_results_record_the_bounds_hit(tmp_path: Path):
    # a box so tight that the near-truth starts sit on it: every fit is labelled, and the
    # labels agree with the on_boundary flag and with the box
    box = {"limits": {"beta0": [-0.5, 0.5]}, "default": [-1.5, 1.5]}
    raw = tiny(sample={"sizes": [60, 120], "replications": 2, "chunk": 2},
               fit={"method": "lm", "max_iter": 2, "bounds": box})
    res = run_sweep(parse_config(raw), tmp_path, progress=False, log=quiet).results
    labels = res["boundary_params"].astype(str)
    assert (labels != "").tolist() == res["on_boundary"].astype(bool).tolist()
    kinds = {k for text in labels for k in text.split(",") if k}
    assert kinds and all(k.split(":")[1] in ("lo", "hi") for k in kinds)
    table = pd.read_csv(tmp_path / "boundary.csv")
    assert set(table["kind"]) == kinds and not table["excluded"].any()



def test_workers_take_the_largest_cells_first():
    cells = [Cell(1, "a", "", 316, 0, (0, 1)), Cell(1, "a", "", 3107, 0, (0, 1)), Cell(1, "b", "", 1000, 0, (0, 1)),
             Cell(2, "a", "", 3107, 0, (0,)), Cell(1, "a", "noise_free", 3107, 0, (0, 1))]
    order = backends.largest_first(cells)
    # most samples (n x replications) first; ties keep the given order; nothing lost or repeated
    assert order == [cells[1], cells[4], cells[3], cells[2], cells[0]]
    assert sorted(order, key=cells.index) == cells


_FAULTS_SCRIPT = """
import resource, sys, torch
from hmoe_sim.sweep import backends
if sys.argv[1] == "keep" and not backends._keep_freed_memory():
    print(-1, 0)  # not glibc
    sys.exit()
sizes = [(1 + (7 * i) % 19) * 2**20 // 8 for i in range(60)]  # arrays of 1..19 MB, three kept alive
def rounds():
    kept = []
    for k in sizes:
        kept.append(torch.empty(k, dtype=torch.float64).fill_(1.0))
        kept = kept[-3:]
rounds()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rounds()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, sum(sizes) * 8 // 4096)
"""


@pytest.mark.skipif(not backends.sys.platform.startswith("linux"), reason="glibc malloc settings (Linux)")
def test_sweep_workers_reuse_freed_memory():
    # a worker asks malloc to keep freed memory: the second round of the same allocations touches no
    # fresh page (by default, measured on the development machine, 6% to 25% of its pages are faulted
    # in anew, depending on the thread count: every freed array above the mmap threshold is unmapped)
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, "keep"], capture_output=True, text=True, check=True)
    faults, pages = (int(v) for v in out.stdout.split())
    if faults < 0:  # pragma: no cover
        pytest.skip("malloc settings not available (not glibc)")
    assert faults < 0.01 * pages
