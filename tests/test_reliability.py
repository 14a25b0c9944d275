"""Reliability of sweeps and inputs (issue 12): run directories that cannot lie, errors before
any work, no orphan processes, file modes, progress without a terminal, library input checks."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import hmoe_sim.sweep.backends as backends
import hmoe_sim.sweep.checks as checks
import hmoe_sim.sweep.runner as runner
import hmoe_sim.sweep.storage as storage
from hmoe_sim import __version__, make_preset, sample_batch
from hmoe_sim.cli import build_parser, main
from hmoe_sim.estimators import Bounds, LeastSquaresMoE, fit_batch, init_near_truth
from hmoe_sim.hora import HoRALinear, LoRALinear, MultiHeadAttention, MultiHeadLoRALinear
from hmoe_sim.sweep import RunDir, parse_config, plan_cells, run_sweep
from hmoe_sim.sweep.cells import CELL_SCHEMA_VERSION, Cell, cell_hash, cell_spec
from hmoe_sim.sweep.lock import LOCK_FILE, RunLocked
from hmoe_sim.sweep.runner import SweepInterrupted
from hmoe_sim.sweep.storage import atomic_write

ROOT = Path(__file__).resolve().parents[1]

TOML = """
name = "rel"
root_seed = 11

[truth]
preset = "hmoe-shared"
seed = 0
options = { expert_std = 1.0, gate_slope_std = 1.0 }

[sample]
sizes = [60, 120]
replications = 2
chunk = 1

[fit]
method = "lm"
max_iter = 4

[[series]]
name = "shared"
structure = "shared"

[[series]]
name = "nonshared"
structure = "nonshared"

[losses]
l2_n_eval = 500
"""

#: one series, two cells: for tests that need a fresh computation
SMALL = TOML.replace('[[series]]\nname = "nonshared"\nstructure = "nonshared"\n', "").replace("chunk = 1", "chunk = 2")


def config_of(text: str):
    return parse_config(tomllib.loads(text))


def quiet(msg: str) -> None:
    """Swallow the runner's log lines."""


def write_toml(tmp_path: Path, text: str, name: str = "rel.toml") -> Path:
    f = tmp_path / name
    f.write_text(text)
    return f


def no_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("a fit was started")

    monkeypatch.setattr(backends, "run_cell", never)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """A finished run of TOML (8 cells) and its results; copy the directory before changing it."""
    out = tmp_path_factory.mktemp("reference")
    outcome = run_sweep(config_of(TOML), out, progress=False, log=quiet)
    assert (outcome.reused, outcome.computed) == (0, 8)
    return out, outcome.results


def copy_of(reference: tuple[Path, pd.DataFrame], tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(reference[0], target)
    return target


# ---------------------------------------------------------------------------------------- item 1
def test_second_sweep_into_a_locked_directory_exits_2_naming_the_holder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    no_fits(monkeypatch)
    out = tmp_path / "run"
    cfg = write_toml(tmp_path, TOML)
    with RunDir(out).lock():
        holder = RunDir(out).lock_holder()
        assert holder["pid"] == os.getpid() and holder["started"]
        assert main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"pid {os.getpid()}" in err and f"started {holder['started']}" in err and "in use" in err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not (out / "config.resolved.json").exists()
        with pytest.raises(RunLocked):
            with RunDir(out).lock():
                pass
    assert not (out / LOCK_FILE).exists()  # released


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "started": "2020-01-01T00:00:00+00:00"}))
    leftover = out / f".results.parquet.hmoe-sim-{dead.pid}-0123456789ab.tmp"
    leftover.write_bytes(b"half a file")
    messages: list[str] = []
    outcome = run_sweep(config_of(SMALL), out, progress=False, log=messages.append)
    assert outcome.computed == 2
    notice = next(m for m in messages if "stale lock" in m)
    assert f"pid {dead.pid}" in notice and "2020-01-01" in notice and "gone" in notice
    assert any("removed 1 partial file" in m for m in messages)
    assert not leftover.exists() and not (out / LOCK_FILE).exists()


def test_failed_sweep_leaves_the_config_of_the_finished_run(reference, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]):
    out = copy_of(reference, tmp_path)
    before = (out / "config.resolved.json").read_bytes()
    cfg = write_toml(tmp_path, TOML.replace('method = "lm"', 'method = "bfgs"'))
    assert main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert "fit.method" in capsys.readouterr().err
    assert (out / "config.resolved.json").read_bytes() == before
    assert main(["report", str(out)]) == 0


def test_report_and_plot_refuse_results_of_another_config(reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]):
    out = copy_of(reference, tmp_path)
    other = config_of(TOML.replace("root_seed = 11", "root_seed = 12"))

    calls = {"n": 0}

    def interrupted(config_dict, cell):
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(backends, "run_cell", interrupted)
    with pytest.raises(SweepInterrupted):
        run_sweep(other, out, progress=False, log=quiet)
    assert calls["n"] == 1  # the patched function is the one the sweep called
    monkeypatch.undo()
    assert RunDir(out).stored_fingerprint() == other.fingerprint != RunDir(out).results_fingerprint()
    for argv in (["report", str(out)], ["plot", str(out), "--output", str(tmp_path / "x.png")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "does not describe" in err and other.fingerprint in err and "Rerun" in err, argv
        assert err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
    run_sweep(other, out, progress=False, log=quiet)  # finishing the later sweep repairs the directory
    assert main(["report", str(out)]) == 0


# ---------------------------------------------------------------------------------------- item 2
def test_corrupt_misplaced_and_incomplete_cells_are_recomputed(reference, tmp_path: Path):
    out = copy_of(reference, tmp_path)
    config = config_of(TOML)
    run = RunDir(out)
    cells = plan_cells(config)
    paths = [run.cell_path(c, cell_hash(config, c)) for c in cells]
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])  # truncated
    shutil.copyfile(paths[2], paths[1])  # a valid cell under another cell's key
    frame = run.load_cell(cells[3], cell_hash(config, cells[3]), ["D1", "D2", "L2"])
    run.write_cell(cells[3], cell_hash(config, cells[3]), frame.drop(columns="L2"), config.fingerprint)
    messages: list[str] = []
    outcome = run_sweep(config, out, progress=False, log=messages.append)
    assert (outcome.reused, outcome.computed) == (5, 3)
    notices = [m for m in messages if "recomputing" in m]
    assert len(notices) == 3
    assert cells[0].key in notices[0] and "unreadable" in notices[0]
    assert cells[1].key in notices[1] and f"belongs to cell {cells[2].key!r}" in notices[1]
    assert cells[3].key in notices[2] and "'L2'" in notices[2]
    pd.testing.assert_frame_equal(outcome.results, reference[1], check_exact=True)


def test_cell_with_the_wrong_rows_is_recomputed(reference, tmp_path: Path):
    out = copy_of(reference, tmp_path)
    config = config_of(TOML)
    run = RunDir(out)
    cell = plan_cells(config)[0]
    h = cell_hash(config, cell)
    frame = run.load_cell(cell, h, ["D1"])
    run.write_cell(cell, h, pd.concat([frame, frame]), config.fingerprint)  # a duplicated replication
    messages: list[str] = []
    assert run_sweep(config, out, progress=False, log=messages.append).computed == 1
    assert any("2 rows for 1 replications" in m for m in messages)


# ---------------------------------------------------------------------------------------- item 3
def test_description_change_recomputes_nothing(reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = copy_of(reference, tmp_path)
    no_fits(monkeypatch)
    changed = config_of(TOML.replace('name = "rel"', 'name = "rel"\ndescription = "another description"'))
    assert changed.fingerprint != config_of(TOML).fingerprint
    outcome = run_sweep(changed, out, progress=False, log=quiet)
    assert (outcome.reused, outcome.computed) == (8, 0)
    assert set(outcome.results["fingerprint"]) == {changed.fingerprint}
    pd.testing.assert_frame_equal(outcome.results.drop(columns="fingerprint"),
                                  reference[1].drop(columns="fingerprint"), check_exact=True)


@pytest.mark.parametrize(("edit", "new_cells"), [
    (lambda t: t.replace("sizes = [60, 120]", "sizes = [60, 120, 240]"), 2 * 1 * 2),
    (lambda t: t.replace("replications = 2", "replications = 3"), 2 * 2 * 1),
])
def test_adding_a_size_or_a_replication_computes_only_the_new_cells(reference, tmp_path: Path, edit, new_cells):
    out = copy_of(reference, tmp_path)
    outcome = run_sweep(config_of(edit(TOML)), out, progress=False, log=quiet)
    assert (outcome.reused, outcome.computed) == (8, new_cells)
    key = ["series", "n", "replication"]
    old = outcome.results.merge(reference[1][key], on=key).drop(columns="fingerprint")
    pd.testing.assert_frame_equal(old, reference[1].drop(columns="fingerprint"), check_exact=True)


def test_chunks_are_fixed_blocks_whatever_the_replication_count():
    two = config_of(TOML.replace("chunk = 1", "chunk = 10"))
    assert two.sample.chunk == 10  # no longer clipped to the replication count
    a = config_of(TOML.replace("chunk = 1", "chunk = 2").replace("replications = 2", "replications = 4"))
    b = config_of(TOML.replace("chunk = 1", "chunk = 2").replace("replications = 2", "replications = 5"))
    ha = {c: cell_hash(a, c) for c in plan_cells(a)}
    hb = {c: cell_hash(b, c) for c in plan_cells(b)}
    assert set(ha.items()) <= set(hb.items())  # every cell of the 4-replication plan is reused
    assert sorted(c.reps for c in hb if c.n == 60 and c.series == "shared") == [(0, 1), (2, 3), (4,)]


def test_cell_spec_holds_what_determines_a_cell_and_nothing_else():
    config = config_of(TOML)
    cell = plan_cells(config)[0]
    spec = cell_spec(config, cell)
    json.dumps(spec)
    # fields added later enter too; a noise level only when the cell has one (older cells keep their hashes)
    assert set(spec["cell"]) == {f.name for f in dataclasses.fields(Cell)} - {"sigma"}
    assert cell_spec(config, dataclasses.replace(cell, sigma=0.01))["cell"]["sigma"] == 0.01
    assert (spec["cell"]["series"], spec["cell"]["n"], spec["cell"]["reps"]) == (cell.series, cell.n, list(cell.reps))
    assert spec["schema"] == CELL_SCHEMA_VERSION and spec["version"] == __version__
    assert "name" not in spec["series"] and spec["series"]["structure"] == "shared"
    assert "description" not in json.dumps(spec) and "replications" not in json.dumps(spec)
    base = {c: cell_hash(config, c) for c in plan_cells(config)}
    seed = config_of(TOML.replace("root_seed = 11", "root_seed = 12"))
    assert not set(base.values()) & {cell_hash(seed, c) for c in plan_cells(seed)}
    fit = config_of(TOML.replace('structure = "nonshared"', 'structure = "nonshared"\nfit = { max_iter = 5 }'))
    changed = {c for c in plan_cells(fit) if cell_hash(fit, c) != base[c]}
    assert changed == {c for c in base if c.series == "nonshared"}
    with pytest.raises(ValueError, match="not in the configuration"):
        cell_hash(config, Cell(0, "nope", "", 60, 0, (0,)))


# ---------------------------------------------------------------------------------------- item 4
@pytest.mark.parametrize(("edit", "key", "value"), [
    (lambda t: t.replace('method = "lm"', 'method = "bfgs"'), "fit.method", "bfgs"),
    (lambda t: t.replace("max_iter = 4", "max_iter = 4\ntol = 0"), "fit.tol", "0"),
    (lambda t: t.replace('method = "lm"', 'method = "adam"\noptions = { lr = -1 }'), "fit.options.lr", "-1"),
    (lambda t: t.replace('method = "lm"', 'method = "sgd-paper"\noptions = { epochs = 0 }'), "fit.options.epochs", "0"),
    (lambda t: t.replace('method = "lm"', 'method = "sgd-paper"\noptions = { epochs = 2.5 }'), "fit.options.epochs",
     "2.5"),
    (lambda t: t.replace('method = "lm"', 'method = "lm"\noptions = { loss = "l1" }'), "fit.options.loss", "l1"),
    (lambda t: t.replace('method = "lm"', 'method = "lm"\noptions = { chunk_size = 0 }'), "fit.options.chunk_size",
     "0"),
    (lambda t: t.replace("sizes = [60, 120]", "sizes = [1, 120]"), "sample.sizes[0]", "1"),
    (lambda t: t.replace("sizes = [60, 120]", "sizes = [60, 10000000000]"), "sample.sizes", "10000000000"),
])
def test_bad_settings_exit_2_before_any_fit_or_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str], edit, key, value):
    no_fits(monkeypatch)
    cfg = write_toml(tmp_path, edit(TOML))
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hmoe-sim: error:") and err.count("\n") == 1, err
    assert key in err and value in err, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------- item 5
def test_out_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cfg = write_toml(tmp_path, TOML)
    target = tmp_path / "taken"
    target.write_text("not a directory")
    assert main(["sweep", str(cfg), "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is an existing file" in err and err.count("\n") == 1 and target.read_text() == "not a directory"


def _deny_writes_under(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make ``root`` and everything below it look read-only to the storage layer (tests run as root)."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve().is_relative_to(root.resolve()):
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(storage.os, "access", access)


def test_read_only_out_is_one_line_for_sweep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]):
    no_fits(monkeypatch)
    cfg = write_toml(tmp_path, TOML)
    locked = tmp_path / "readonly"
    locked.mkdir()
    _deny_writes_under(monkeypatch, locked)
    assert main(["sweep", str(cfg), "--out", str(locked / "run")]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (locked / "run").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode-0555 directory anyway")
def test_read_only_out_by_permissions(tmp_path: Path, capsys: pytest.CaptureFixture[str]):  # pragma: no cover
    cfg = write_toml(tmp_path, TOML)
    locked = tmp_path / "readonly"
    locked.mkdir(mode=0o555)
    assert main(["sweep", str(cfg), "--out", str(locked / "run")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_report_on_a_read_only_directory_prints_without_writing(reference, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]):
    out = copy_of(reference, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _deny_writes_under(monkeypatch, out)
    assert main(["report", str(out)]) == 0
    captured = capsys.readouterr()
    assert "read-only" in captured.err and "rel (8 fits" in captured.out and "shared" in captured.out
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    monkeypatch.undo()

    def refused(path, write):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(storage, "atomic_write", refused)
    assert main(["report", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Permission denied" in captured.err and "rel (8 fits" in captured.out


def test_config_path_that_is_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["sweep", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "does not exist" not in err


def test_unreachable_dask_scheduler_is_one_line_and_quick(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]):
    pytest.importorskip("dask.distributed")
    no_fits(monkeypatch)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_toml(tmp_path, TOML)
    start = time.monotonic()
    code = main(["sweep", str(cfg), "--out", str(tmp_path / "run"), "--backend", "dask",
                 "--scheduler", f"tcp://127.0.0.1:{port}"])
    assert code == 2 and time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert "cannot reach the dask scheduler" in err and str(port) in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_ctrl_c_ends_with_one_line_and_the_rerun_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]):
    real = backends.run_cell
    calls = {"n": 0}

    def ctrl_c_on_third(config_dict, cell):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(config_dict, cell)

    monkeypatch.setattr(backends, "run_cell", ctrl_c_on_third)
    cfg = write_toml(tmp_path, TOML)
    out = tmp_path / "run"
    assert main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 130
    assert calls["n"] == 3  # the patched function is the one the sweep called
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "hmoe-sim: interrupted; 2 of 8 cells done (2 this run), rerun the same command " \
                                   "to resume"
    assert "Traceback" not in err and not (out / LOCK_FILE).exists()
    monkeypatch.setattr(backends, "run_cell", real)
    assert main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert "8 cells (2 reused, 6 computed)" in capsys.readouterr().out


def test_debug_adds_the_traceback_and_version_prints(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cfg = write_toml(tmp_path, TOML.replace('method = "lm"', 'method = "bfgs"'))
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "Traceback" not in capsys.readouterr().err
    for argv in (["--debug", "sweep", str(cfg), "--out", str(tmp_path / "run")],
                 ["sweep", str(cfg), "--out", str(tmp_path / "run"), "--debug"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.splitlines()[-1].startswith("hmoe-sim: error:")
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"hmoe-sim {__version__}"


def test_every_option_has_help_and_the_config_reference_covers_every_key():
    parser = build_parser()
    assert "HoRA" in parser.description and "experiments/configs/README.md" in parser.epilog
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in [("hmoe-sim", parser), *subparsers.items()]:
        for action in sub._actions:
            if action.dest not in ("help", "command"):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
    reference = (ROOT / "experiments" / "configs" / "README.md").read_text()
    resolved = config_of(TOML).to_dict()

    def keys(prefix: str, node: object) -> list[str]:
        if not isinstance(node, dict) or prefix in ("truth.options", "fit.bounds", "fit.options"):
            return [prefix]
        return [k for name, value in node.items() for k in keys(f"{prefix}.{name}".lstrip("."), value)]

    series_fit = {f"fit.{k}" for k in resolved["series"][0]["fit"]}
    wanted = {k for k in keys("", {k: v for k, v in resolved.items() if k != "series"})} | series_fit
    wanted |= {f"series.{k}" for k in resolved["series"][0] if k != "fit"} | {"sample.grid"}
    wanted |= {f"fit.bounds.{k}" for k in ("default", "limits", "boundary_tol")}
    wanted |= {f"fit.options.{k}" for k in ("lr", "epochs", "batch_size", "loss", "chunk_size", "ftol", "xtol", "gtol")}
    wanted |= {"truth.seeds", "fit.random_starts", "fit.near_optimal_loglik", "sample.controls",
               "allow_nonidentifiable"}
    missing = sorted(k for k in wanted if f"`{k}`" not in reference)
    assert not missing, f"experiments/configs/README.md lacks {missing}"


# ---------------------------------------------------------------------------------------- item 6
def _fit_data(B: int = 2, n: int = 80):
    s = make_preset("softmax-linear", seed=0)
    X, y = sample_batch(s.true_model, s.truth, n, s.noise_std, [np.random.SeedSequence([3, b]) for b in range(B)])
    init = init_near_truth(s.fit_model, s.true_model, s.truth, batch_shape=B, perturbation=0.05, seed=1)
    return s, X, y, init


@pytest.mark.parametrize(("array", "index", "value"), [("X", (1, 7, 0), float("nan")), ("y", (0, 3), float("inf")),
                                                       ("y", (1, 0), float("-inf"))])
def test_non_finite_data_raise_naming_the_array_and_index(array, index, value):
    s, X, y, init = _fit_data()
    bad = {"X": X.clone(), "y": y.clone()}
    bad[array][index] = value
    with pytest.raises(ValueError, match=re.escape(f"{array} contains non-finite values (first at index {index}")):
        fit_batch(s.fit_model, bad["X"], bad["y"], init, max_iter=2)
    single_X, single_y = bad["X"][index[0]], bad["y"][index[0]]
    with pytest.raises(ValueError, match=re.escape(f"{array} contains non-finite values (first at index "
                                                   f"{(0, *index[1:])}")):
        LeastSquaresMoE(s.fit_model, max_iter=2).fit(single_X, single_y)


def test_non_finite_entries_outside_the_mask_are_ignored():
    s, X, y, init = _fit_data()
    mask = torch.ones(y.shape, dtype=torch.bool)
    mask[1, -5:] = False
    X, y = X.clone(), y.clone()
    X[1, -1, 0], y[1, -2] = float("nan"), float("inf")
    result = fit_batch(s.fit_model, X, y, init, max_iter=2, mask=mask)
    assert not result.diverged.any()


def test_init_outside_the_box_raises_naming_parameter_and_bound():
    s, X, y, init = _fit_data()
    box = Bounds({"beta0": (-0.5, 0.5)})
    inside = box.project(s.fit_model, init)
    assert fit_batch(s.fit_model, X, y, inside, bounds=box, max_iter=2).n_iter.shape == (2,)
    outside = {k: v.clone() for k, v in inside.items()}
    outside["beta0"][1, 2] = 0.75
    with pytest.raises(ValueError, match=r"parameter 'beta0' entry \(2,\) of start 1 is 0\.75.*upper bound 0\.5"):
        fit_batch(s.fit_model, X, y, outside, bounds=box, max_iter=2)
    outside = {k: v.clone() for k, v in inside.items()}
    name = next(k for k in outside if k != "beta0")
    outside[name].view(2, -1)[0, 0] = -11.0
    with pytest.raises(ValueError, match=rf"parameter '{name}' .* of start 0 is -11\.0.*lower bound -10\.0"):
        fit_batch(s.fit_model, X, y, outside, max_iter=2)


def test_float16_data_raise_naming_the_dtype():
    s, X, y, init = _fit_data()
    with pytest.raises(TypeError, match=r"torch\.float16.*torch\.float32, torch\.float64"):
        fit_batch(s.fit_model, X.half(), y.half(), init, max_iter=2)
    with pytest.raises(ValueError, match="float16"):
        fit_batch(s.fit_model, X, y, init, max_iter=2, dtype="float16")
    # converting on the way in is fine
    assert fit_batch(s.fit_model, X.half(), y.half(), init, max_iter=2, dtype="float64").risk.dtype == torch.float64


def _poisoned_linear(n_in: int = 6, n_out: int = 4) -> nn.Linear:
    base = nn.Linear(n_in, n_out, dtype=torch.float64)
    with torch.no_grad():
        base.weight[2, 3] = float("nan")
    return base


@pytest.mark.parametrize("make", [
    lambda base: LoRALinear(base, 2),
    lambda base: HoRALinear(base, 2, 2, hyper_dim=2),
    lambda base: MultiHeadLoRALinear(base, 2, 2),
])
def test_adapters_refuse_non_finite_base_weights(make):
    with pytest.raises(ValueError, match=r"base\.weight contains non-finite values \(first at index \(2, 3\)"):
        make(_poisoned_linear())
    base = nn.Linear(6, 4, dtype=torch.float64)
    with torch.no_grad():
        base.bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"base\.bias contains non-finite values \(first at index \(1,\)"):
        make(base)


def test_hora_refuses_non_finite_embeddings_and_factors():
    base = nn.Linear(6, 4, dtype=torch.float64)
    emb = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    with torch.no_grad():
        emb[1, 0] = float("nan")
    with pytest.raises(ValueError, match="head_embeddings contains non-finite"):
        HoRALinear(base, 2, 2, hyper_dim=3, head_embeddings=emb)
    A, B = torch.zeros(2, 2, 6, dtype=torch.float64), torch.zeros(2, 2, 2, dtype=torch.float64)
    A[0, 1, 5] = float("inf")
    with pytest.raises(ValueError, match=r"A contains non-finite values \(first at index \(0, 1, 5\)"):
        MultiHeadLoRALinear.from_factors(base, A, B)


def test_from_torch_refuses_non_finite_weights():
    mha = nn.MultiheadAttention(8, 2, dtype=torch.float64)
    with torch.no_grad():
        mha.out_proj.weight[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"mha\.out_proj\.weight contains non-finite"):
        MultiHeadAttention.from_torch(mha, adapter="hora")


@pytest.mark.parametrize("make", [lambda base: LoRALinear(base, 2), lambda base: HoRALinear(base, 2, 2)])
def test_adapter_forward_names_both_widths(make):
    layer = make(nn.Linear(6, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"in_features=6 .*got width 5"):
        layer(torch.zeros(3, 5, dtype=torch.float64))
    assert layer(torch.zeros(3, 6, dtype=torch.float64)).shape == (3, 4)


# ---------------------------------------------------------------------------------------- item 7
def _descendants(pid: int) -> set[int]:
    """Every live (non-zombie) descendant of ``pid`` (Linux /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_cli_sweep(tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A `--jobs 2` sweep of many cheap cells in a subprocess, waited on until its first cell is stored."""
    text = TOML.replace("replications = 2", "replications = 60")
    cfg = write_toml(tmp_path, text)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "hmoe_sim.cli", "sweep", str(cfg), "--out", str(out), "--jobs", "2",
                             "--no-progress"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("cells/*.parquet")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the sweep did not start: {proc.communicate()}")
        time.sleep(0.1)
    return proc, cfg, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_stops_a_parallel_sweep_with_no_child_left(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    proc, cfg, out = _start_cli_sweep(tmp_path)
    children = _descendants(proc.pid)
    assert len(children) >= 2  # two workers (and the pool's resource tracker)
    # meanwhile a second sweep into the same directory is refused, naming the running one
    assert main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert f"pid {proc.pid}" in capsys.readouterr().err
    proc.send_signal(signal.SIGTERM)
    start = time.monotonic()
    _, err = proc.communicate(timeout=15)
    assert time.monotonic() - start < 10
    assert proc.returncode == 128 + signal.SIGTERM
    assert "terminated (SIGTERM);" in err and "rerun the same command to resume" in err and "Traceback" not in err
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)]
    assert not (out / LOCK_FILE).exists()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_leaves_no_worker_and_the_next_run_takes_over(tmp_path: Path):
    proc, cfg, out = _start_cli_sweep(tmp_path)
    children = _descendants(proc.pid)
    proc.kill()
    proc.communicate(timeout=15)
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)]
    assert (out / LOCK_FILE).exists()  # left by the killed sweep ...
    messages: list[str] = []
    config = config_of(cfg.read_text())

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:  # ... taken over by the next one (no fitting needed for that)
        mp.setattr(runner, "_compute", stop)
        with pytest.raises(SweepInterrupted) as exc:
            run_sweep(config, out, progress=False, log=messages.append)
    assert any("stale lock" in m and f"pid {proc.pid}" in m for m in messages)
    assert exc.value.done >= 1 and not (out / LOCK_FILE).exists()


# ---------------------------------------------------------------------------------------- item 8
def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_respect_the_umask(tmp_path: Path, umask: int):
    before = os.umask(umask)
    try:
        run_sweep(config_of(SMALL), tmp_path / "run", progress=False, log=quiet)
        atomic_write(tmp_path / "one.txt", lambda f: f.write(b"x"))
    finally:
        os.umask(before)
    modes = _modes(tmp_path / "run")
    assert {"config.resolved.json", "results.parquet", "rates.csv", "summary.csv", "boundary.csv"} <= set(modes)
    assert sum(k.startswith("cells/") for k in modes) == 2
    assert set(modes.values()) == {0o666 & ~umask}
    assert stat.S_IMODE((tmp_path / "one.txt").stat().st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------------------------------- item 9
def test_plain_progress_lines_without_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(runner.sys, "stderr", io.StringIO())  # not a terminal
    lines: list[str] = []
    run_sweep(config_of(SMALL), tmp_path / "a", log=lines.append)
    progress = [m for m in lines if "cells computed" in m]
    assert len(progress) == 1 and progress[0].startswith("rel: 2/2 cells computed")  # throttled: only the last
    monkeypatch.setattr(runner, "PLAIN_PROGRESS_SECONDS", 0.0)
    lines.clear()
    run_sweep(config_of(SMALL), tmp_path / "b", log=lines.append)
    assert [m.split(",")[0] for m in lines if "cells computed" in m] == ["rel: 1/2 cells computed",
                                                                         "rel: 2/2 cells computed"]
    lines.clear()
    run_sweep(config_of(SMALL), tmp_path / "c", log=lines.append, progress=False)
    assert not [m for m in lines if "cells computed" in m]


# ------------------------------------------------------------------- issue 20: tables that agree
def _plot(out: Path, tmp_path: Path) -> list[str]:
    return ["plot", str(out), "--output", str(tmp_path / "fig.png")]


def test_kill_between_results_and_rates_makes_plot_refuse_until_report(
        reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    out = copy_of(reference, tmp_path)
    old = RunDir(out).stored_fingerprint()
    assert set(pd.read_csv(out / "rates.csv")["fingerprint"]) == {old}
    assert set(pd.read_csv(out / "summary.csv")["fingerprint"]) == {old}
    other = config_of(TOML.replace('name = "rel"', 'name = "rel"\ndescription = "a later run"'))  # reuses cells
    real = RunDir.write_table

    def killed(self, name, frame, fingerprint=None):
        if name == "rates.csv":
            raise KeyboardInterrupt
        return real(self, name, frame, fingerprint)

    monkeypatch.setattr(RunDir, "write_table", killed)
    with pytest.raises(SweepInterrupted):
        run_sweep(other, out, progress=False, log=quiet)
    monkeypatch.undo()
    assert RunDir(out).results_fingerprint() == other.fingerprint != old
    assert main(_plot(out, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err == (f"hmoe-sim: error: rates.csv was written for fingerprint {old} but config is {other.fingerprint}; "
                   f"rerun `hmoe-sim report {out}`\n")
    assert not (tmp_path / "fig.png").exists()
    assert main(["report", str(out)]) == 0
    capsys.readouterr()
    assert set(pd.read_csv(out / "rates.csv")["fingerprint"]) == {other.fingerprint}
    assert main(_plot(out, tmp_path)) == 0 and (tmp_path / "fig.png").is_file()


def test_edited_config_is_refused_by_report_and_plot(reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = copy_of(reference, tmp_path)
    f = out / "config.resolved.json"
    body = json.loads(f.read_text())
    assert body["version"] == __version__
    body["config"]["root_seed"] = 99
    f.write_text(json.dumps(body))
    for argv in (["report", str(out)], _plot(out, tmp_path)):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"records fingerprint {body['fingerprint']} but its config hashes to" in err and "edited" in err
        assert err.count("\n") == 1


def test_config_without_a_recorded_version_is_read_with_a_notice_when_unverifiable(
        reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = copy_of(reference, tmp_path)
    f = out / "config.resolved.json"
    body = json.loads(f.read_text())
    del body["version"]  # as written before issue 20: hashed with the running version, it still matches
    f.write_text(json.dumps(body))
    assert main(["report", str(out)]) == 0
    assert "could not be verified" not in capsys.readouterr().err
    body["config"]["description"] = "written by an older hmoe-sim"
    f.write_text(json.dumps(body))
    assert main(["report", str(out)]) == 0
    assert "could not be verified" in capsys.readouterr().err


def test_results_with_a_planned_fit_missing_are_refused(reference, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]):
    out = copy_of(reference, tmp_path)
    run = RunDir(out)
    results = run.read_results()
    run.write_results(results.iloc[1:].reset_index(drop=True), run.stored_fingerprint())
    for argv in (["report", str(out)], _plot(out, tmp_path)):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"holds {len(results) - 1} fits but the config plans {len(results)}" in err
        assert "1 planned fit(s) missing" in err and "hmoe-sim sweep" in err and err.count("\n") == 1


def test_tables_of_an_older_version_without_fingerprint_are_read_with_a_notice(
        reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = copy_of(reference, tmp_path)
    for name in ("rates.csv", "summary.csv"):
        pd.read_csv(out / name).drop(columns="fingerprint").to_csv(out / name, index=False)
    assert main(_plot(out, tmp_path)) == 0
    assert "carries no fingerprint" in capsys.readouterr().err


def test_committed_runs_pass_report_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    runs = sorted(p.parent for p in (ROOT / "experiments" / "results").glob("*/config.resolved.json"))
    assert ROOT / "experiments" / "results" / "quick" in runs
    for run in [ROOT / "experiments" / "results" / "quick"]:  # the quickest; every committed run was checked by hand
        copy = tmp_path / run.name
        shutil.copytree(run, copy)
        assert main(["report", str(copy)]) == 0, run
        assert main(_plot(copy, tmp_path)) == 0, run


# ------------------------------------------------------------------ issue 20: checks before work
@pytest.mark.parametrize("edit,key,value", [
    (lambda t: t.replace('name = "shared"', f'name = "{"s" * 240}"'), "series[0].name", "s" * 240),
    (lambda t: t.replace('name = "rel"', f'name = "{"r" * 260}"'), "'name'", "r" * 260),
    (lambda t: t.replace('method = "lm"', 'method = "lm"\noptions = { max_memory = 1 }'),
     "fit.options.max_memory", "1 bytes"),
    (lambda t: t.replace('method = "lm"', 'method = "lm"\noptions = { max_memory = "lots" }'),
     "fit.options.max_memory", "'lots'"),
    (lambda t: t.replace("replications = 2", "replications = 1000000"), "sample.replications", "4000000 fits"),
    (lambda t: t.replace("replications = 2", "replications = 1000000000"), "sample.replications", "1000000000"),
])
def test_checks_before_any_work_name_the_key_and_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str], edit, key, value):
    no_fits(monkeypatch)
    cfg = write_toml(tmp_path, edit(TOML))
    started = time.monotonic()
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.startswith("hmoe-sim: error:") and err.count("\n") == 1, err
    assert key in err and value in err, err
    assert not (tmp_path / "run").exists()


def test_plan_cap_names_the_cells():
    with pytest.raises(ValueError, match=r"sample.replications.*1000000 replications plan 4000000 fits in 4000000 "
                                         r"cells"):
        config_of(TOML.replace("replications = 2", "replications = 1000000"))


def test_cpu_memory_check_uses_available_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    available = checks.cpu_available_memory()
    assert 0 < available <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    monkeypatch.setattr(checks, "cpu_available_memory", lambda: 1024**2)
    with pytest.raises(ValueError, match=r"sample.sizes.*n = 100000 .*cpu memory \(0.0 GiB available\)"):
        run_sweep(config_of(TOML.replace("sizes = [60, 120]", "sizes = [60, 100000]")), tmp_path / "run",
                  progress=False, log=quiet)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------ issue 20: output paths
def test_empty_out_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    no_fits(monkeypatch)
    cfg = write_toml(tmp_path, TOML)
    monkeypatch.chdir(tmp_path)
    for argv in (["sweep", str(cfg), "--out", "", "--no-progress"], ["report", ""], ["plot", " "]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "is empty" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel.toml"]


def test_dangling_symlink_out_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]):
    no_fits(monkeypatch)
    cfg = write_toml(tmp_path, TOML)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    for out in (link, link / "run"):
        assert main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{str(link)!r} is a dangling symbolic link" in err and "nowhere" in err and err.count("\n") == 1


def test_directory_where_a_cell_file_belongs_is_named_before_work(
        reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    out = copy_of(reference, tmp_path)
    config = config_of(TOML)
    cell = plan_cells(config)[0]
    path = RunDir(out).cell_path(cell, cell_hash(config, cell))
    path.unlink()
    path.mkdir()
    no_fits(monkeypatch)
    before = (out / "config.resolved.json").read_bytes()
    assert main(["sweep", str(write_toml(tmp_path, TOML)), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{str(path)!r} is a directory" in err and err.count("\n") == 1, err
    assert (out / "config.resolved.json").read_bytes() == before


def test_atomic_write_names_the_target_not_the_temporary_file(tmp_path: Path):
    target = tmp_path / "x.csv"
    target.mkdir()
    with pytest.raises(OSError) as info:
        atomic_write(target, lambda f: f.write(b"1"))
    assert info.value.filename == str(target)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
