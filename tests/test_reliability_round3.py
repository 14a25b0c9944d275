"""Reliability, round three: nothing written where it should not be, every plan checked before work.

Files (the package writes only its own files under --out, through a temporary name, never
through a symbolic link), dask schedulers checked before anything is written, plans that the
machine cannot run refused before work, preset options checked alike, and the scikit-learn
estimator contract of the estimators.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from test_reliability import ROOT, SMALL, _descendants, _start_cli_sweep, config_of, no_fits, quiet, write_toml

import hmoe_sim.sweep.backends as backends
import hmoe_sim.sweep.checks as checks
from hmoe_sim import make_preset
from hmoe_sim.cli import main
from hmoe_sim.models.presets import PRESETS
from hmoe_sim.sweep import RunDir, plan_cells, run_sweep
from hmoe_sim.sweep.cells import cell_hash
from hmoe_sim.sweep.lock import LOCK_FILE
from hmoe_sim.sweep.storage import atomic_write


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run of SMALL (2 cells); copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run_sweep(config_of(SMALL), out, progress=False, log=quiet)
    return out


def copy_run(finished: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished, target, symlinks=True)
    return target


def outside_file(tmp_path: Path) -> Path:
    """A file outside every run directory that nothing may overwrite."""
    victim = tmp_path / "outside" / "precious.txt"
    victim.parent.mkdir()
    victim.write_text("the user's own file\n")
    return victim


def one_line_naming(err: str, path: Path) -> None:
    assert err.startswith("hmoe-sim: error:") and err.count("\n") == 1, err
    assert str(path) in err and "symbolic link" in err, err


# ------------------------------------------------------------------------------ class 1: files
def test_stale_lock_takeover_removes_only_the_package_own_temporary_files(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    (out / "cells").mkdir(parents=True)
    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                             "started": "2020-01-01T00:00:00+00:00"}))
    ours = [out / f".results.parquet.hmoe-sim-{dead.pid}-0123456789ab.tmp",
            out / "cells" / f".x__0123456789abcdef.parquet.hmoe-sim-{dead.pid}-abcdefabcdef.tmp"]
    theirs = [out / ".notes.tmp", out / "cells" / ".mine.tmp", out / ".results.parquet.0123456789ab.tmp",
              out / f".rates.csv.hmoe-sim-{dead.pid}-0123456789ab.tmp.bak",
              out / f".rates.csv.hmoe-sim-{dead.pid}-0123456789AB.tmp"]
    for p in ours + theirs:
        p.write_bytes(b"half a file")
    link = out / f".summary.csv.hmoe-sim-{dead.pid}-0123456789ab.tmp"  # our pattern, but a link: not ours
    victim = outside_file(tmp_path)
    link.symlink_to(victim)
    messages: list[str] = []
    run_sweep(config_of(SMALL), out, progress=False, log=messages.append)
    assert any("removed 2 partial file" in m for m in messages), messages
    assert not any(p.exists() for p in ours)
    assert all(p.read_bytes() == b"half a file" for p in theirs)
    assert link.is_symlink() and victim.read_text() == "the user's own file\n"


def test_temporary_names_are_recognisable_and_left_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from hmoe_sim.files import is_own_temporary

    seen: list[str] = []

    def write(f):
        seen.extend(p.name for p in tmp_path.iterdir() if p.name != "t.csv")
        f.write(b"1\n")

    atomic_write(tmp_path / "t.csv", write)
    assert len(seen) == 1 and is_own_temporary(seen[0]) and f"-{os.getpid()}-" in seen[0], seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.csv"]
    assert not is_own_temporary(".t.csv.0123456789ab.tmp") and not is_own_temporary("t.csv")


def test_symlink_at_the_lock_path_is_refused_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]):
    no_fits(monkeypatch)
    victim = outside_file(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).symlink_to(victim)
    assert main(["sweep", str(write_toml(tmp_path, SMALL)), "--out", str(out), "--no-progress"]) == 2
    one_line_naming(capsys.readouterr().err, out / LOCK_FILE)
    assert victim.read_text() == "the user's own file\n"
    assert not (out / "config.resolved.json").exists()


@pytest.mark.parametrize("name", ["rates.csv", "results.parquet", "config.resolved.json", "rel.png", "cells"])
def test_symlink_at_an_output_path_is_refused_before_work(finished: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], name: str):
    out = copy_run(finished, tmp_path)
    victim = outside_file(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != name}
    if name == "cells":
        shutil.move(str(out / "cells"), str(tmp_path / "elsewhere"))
        (out / "cells").symlink_to(tmp_path / "elsewhere")
    else:
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(victim)
    no_fits(monkeypatch)
    assert main(["sweep", str(write_toml(tmp_path, SMALL)), "--out", str(out), "--no-progress"]) == 2
    one_line_naming(capsys.readouterr().err, out / name)
    assert victim.read_text() == "the user's own file\n"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != name} == before


def test_symlink_at_a_cell_path_is_refused_before_work(finished: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]):
    out = copy_run(finished, tmp_path)
    config = config_of(SMALL)
    cell = plan_cells(config)[0]
    path = RunDir(out).cell_path(cell, cell_hash(config, cell))
    victim = tmp_path / "outside.parquet"
    path.rename(victim)
    path.symlink_to(victim)
    no_fits(monkeypatch)
    assert main(["sweep", str(write_toml(tmp_path, SMALL)), "--out", str(out), "--no-progress"]) == 2
    one_line_naming(capsys.readouterr().err, path)


@pytest.mark.parametrize("default_target", [True, False])
def test_plot_refuses_a_symlink_at_the_figure_path(finished: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str], default_target: bool):
    out = copy_run(finished, tmp_path)
    victim = outside_file(tmp_path)
    figure = out / "rel.png" if default_target else tmp_path / "fig.png"
    figure.symlink_to(victim)
    argv = ["plot", str(out)] + ([] if default_target else ["--output", str(figure)])
    assert main(argv) == 2
    one_line_naming(capsys.readouterr().err, figure)
    assert victim.read_text() == "the user's own file\n"


def test_figure_is_written_through_a_temporary_file(finished: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]):
    from matplotlib.figure import Figure

    out = copy_run(finished, tmp_path)
    assert main(["plot", str(out)]) == 0
    figure = out / "rel.png"
    good = figure.read_bytes()
    assert good.startswith(b"\x89PNG")
    real = Figure.savefig

    def dies_half_way(self, fname, *args, **kwargs):
        if isinstance(fname, str | os.PathLike):  # written in place: a partial file where the figure was
            Path(fname).write_bytes(b"\x89PNG half")
        else:
            fname.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", dies_half_way)
    assert main(["plot", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert figure.read_bytes() == good
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    monkeypatch.setattr(Figure, "savefig", real)
    assert main(["plot", str(out), "--output", str(tmp_path / "fig.svg")]) == 0
    assert (tmp_path / "fig.svg").read_text().lstrip().startswith("<?xml")


def test_atomic_write_refuses_a_symlink_target(tmp_path: Path):
    victim = outside_file(tmp_path)
    link = tmp_path / "table.csv"
    link.symlink_to(victim)
    with pytest.raises(ValueError, match="symbolic link") as info:
        atomic_write(link, lambda f: f.write(b"overwritten"))
    assert str(link) in str(info.value) and victim.read_text() == "the user's own file\n" and link.is_symlink()


def _writes_outside_the_helper(tree: ast.AST) -> list[str]:
    """Calls that write a file (by name or object) anywhere but in a callback given to ``atomic_write``."""
    writers = {"savefig", "write_text", "write_bytes", "to_csv", "to_parquet", "replace", "write_table", "dump",
               "save", "open"}
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "atomic_write":
            inside |= {id(n) for arg in node.args for n in ast.walk(arg)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and id(node) not in inside:
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            owner = getattr(getattr(node.func, "value", None), "id", "")
            modes = [a.value for a in node.args[1:2] + [k.value for k in node.keywords if k.arg == "mode"]
                     if isinstance(a, ast.Constant)]
            reads_only = name == "open" and not owner and not any(set(str(m)) & set("wax+") for m in modes)
            if name in writers and not reads_only and (name not in ("replace", "write_table") or owner in ("os", "pq")):
                found.append(f"{owner + '.' if owner else ''}{name}")
    return found


def test_every_write_of_the_package_goes_through_the_one_helper():
    """No module writes a file except :mod:`hmoe_sim.files` and callbacks given to its ``atomic_write``."""
    root = Path(__file__).resolve().parents[1] / "hmoe_sim"
    found = {}
    for f in sorted(root.rglob("*.py")):
        if f != root / "files.py":
            calls = _writes_outside_the_helper(ast.parse(f.read_text()))
            if calls:
                found[str(f.relative_to(root))] = calls
    # _write_parquet writes into the file object atomic_write opened (its callers pass one); os.open: the lock
    # file (opened without following a link, checked by test_symlink_at_the_lock_path_is_refused_naming_it) and
    # /dev/null in cli.py (to silence a closed pipe)
    assert found == {"sweep/storage.py": ["pq.write_table"], "sweep/lock.py": ["os.open"], "cli.py": ["os.open"]}


def test_rates_table_is_readable_after_the_change(finished: Path):
    """The tables written through file objects read back as before."""
    rates = pd.read_csv(finished / "rates.csv")
    assert {"series", "loss", "fingerprint"} <= set(rates.columns)


# -------------------------------------------------------------------------- class 2: schedulers
class _Deadline(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail a test that would hang (no pytest-timeout here): SIGALRM after ``seconds``."""
    def expire(signum, frame):
        raise _Deadline(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def local_service(greeting: bytes | None) -> Iterator[str]:
    """A TCP service on 127.0.0.1 that accepts connections and then says ``greeting`` (or nothing, ever)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = server.accept()
                held.append(conn)
                if greeting is not None:
                    conn.sendall(greeting)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()
        for conn in held:
            conn.close()


def _dask_sweep(tmp_path: Path, out: Path, scheduler: str) -> list[str]:
    return ["sweep", str(write_toml(tmp_path, SMALL)), "--out", str(out), "--no-progress", "--backend", "dask",
            "--scheduler", scheduler]


@pytest.mark.parametrize("greeting", [None, b"SSH-2.0-OpenSSH_9.6\r\n", b"HTTP/1.1 400 Bad Request\r\n\r\n"])
def test_a_service_that_is_no_dask_scheduler_fails_fast_before_any_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], greeting):
    pytest.importorskip("dask.distributed")
    no_fits(monkeypatch)
    monkeypatch.setattr(checks, "SCHEDULER_CHECK_SECONDS", 1.0, raising=False)
    out = tmp_path / "run"
    with local_service(greeting) as address, deadline(30):
        started = time.monotonic()
        code = main(_dask_sweep(tmp_path, out, address))
        took = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2 and took < 10, (code, took, err)
    assert err.startswith("hmoe-sim: error:") and err.count("\n") == 1 and address in err, err
    assert "dask" in err and "MemoryError" not in err and "internal" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("address", ["foo://127.0.0.1:8786", "tcp://127.0.0.1", "inproc://nowhere"])
def test_a_bad_scheduler_address_leaves_a_finished_run_untouched(finished: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str], address: str):
    pytest.importorskip("dask.distributed")
    out = copy_run(finished, tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    other = SMALL.replace("max_iter = 4", "max_iter = 5")  # another config: it would rewrite config.resolved.json
    no_fits(monkeypatch)
    with deadline(30):
        code = main(["sweep", str(write_toml(tmp_path, other)), "--out", str(out), "--no-progress", "--backend",
                     "dask", "--scheduler", address])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and address in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main(["report", str(out)]) == 0


def test_a_dask_scheduler_passes_the_check_and_a_worker_does_not():
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, deadline(60):
        checks.check_dask(cluster.scheduler_address, timeout=5.0)
        worker = next(iter(cluster.scheduler.workers))
        with pytest.raises(ValueError, match=r"is not a dask scheduler \(it says it is 'Worker'\)"):
            checks.check_dask(worker, timeout=5.0)


_STALLING_CLUSTER = """
import sys, time
import hmoe_sim.sweep.backends as backends
from distributed import LocalCluster
real, calls = backends.run_cell, []
def first_only(config_dict, cell):
    calls.append(cell)
    if len(calls) > 1:
        time.sleep(600)
    return real(config_dict, cell)
backends.run_cell = first_only
cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, scheduler_port=int(sys.argv[1]),
                       dashboard_address=None)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_scheduler_lost_mid_run_ends_in_one_line_and_the_rerun_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """One worker thread on the cluster computes the first cell there and stalls on the next; the scheduler
    is then killed: the sweep keeps the cell, says so in one line, and a local rerun computes the rest."""
    pytest.importorskip("dask.distributed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = subprocess.Popen([sys.executable, "-c", _STALLING_CLUSTER, str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = tmp_path / "run"
    killed: list[float] = []

    def kill_after_the_first_cell() -> None:
        while not (out / "cells").is_dir() or not any((out / "cells").glob("*.parquet")):
            if cluster.poll() is not None:
                return
            time.sleep(0.05)
        cluster.kill()
        cluster.wait()
        killed.append(time.monotonic())

    try:
        assert cluster.stdout.readline().strip() == "ready"
        monkeypatch.setattr(backends, "SCHEDULER_LOST_SECONDS", 2.0, raising=False)
        threading.Thread(target=kill_after_the_first_cell, daemon=True).start()
        with deadline(120):
            code = main(_dask_sweep(tmp_path, out, f"tcp://127.0.0.1:{port}"))
    finally:
        cluster.kill()
        cluster.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert killed and time.monotonic() - killed[0] < 60, (code, err)
    assert code == 1 and err[-1].startswith("hmoe-sim: error: lost the dask scheduler at "), err
    assert f"127.0.0.1:{port}" in err[-1] and "1 of 2 cells done" in err[-1] and "rerun" in err[-1], err
    assert [line for line in err if not line.startswith("sweep 'rel'")] == [err[-1]], err  # nothing else
    assert main(["sweep", str(write_toml(tmp_path, SMALL)), "--out", str(out), "--no-progress"]) == 0
    assert "2 cells (1 reused, 1 computed)" in capsys.readouterr().out


# ----------------------------------------------------------------------- class 4: value checks
def _bad_value(key: str, default: object) -> object:
    """A value of option ``key`` that no preset may accept."""
    if key in ("zero_gate_slopes", "noise_std", "min_separation", "gate_bias_std", "gate_slope_std"):
        return -1
    if isinstance(default, str):
        return "bogus"
    return 0


def test_every_preset_option_has_a_rule():
    from hmoe_sim.models.presets import OPTION_RULES

    assert {k for _, defaults, _ in PRESETS.values() for k in defaults} == set(OPTION_RULES)


@pytest.mark.parametrize(("preset", "key"), [(p, k) for p, (_, defaults, _) in sorted(PRESETS.items())
                                             for k in sorted(defaults)])
def test_every_preset_option_is_checked_by_the_same_rule(preset: str, key: str):
    bad = _bad_value(key, PRESETS[preset][1][key])
    with pytest.raises((ValueError, TypeError), match=rf"\b{key}\b"):
        make_preset(preset, **{key: bad})


@pytest.mark.parametrize("preset", ["hmoe-shared", "hmoe-nonshared", "sigmoid-regime1", "softmax-linear"])
def test_n_true_zero_is_refused_before_work_for_every_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str], preset: str):
    no_fits(monkeypatch)
    text = SMALL.replace('preset = "hmoe-shared"', f'preset = "{preset}"').replace(
        "options = { expert_std = 1.0, gate_slope_std = 1.0 }", "options = { n_true = 0 }")
    if preset != "hmoe-shared":
        text = text.replace('structure = "shared"\n', "")
    out = tmp_path / "run"
    assert main(["sweep", str(write_toml(tmp_path, text)), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "n_true must be a positive integer, got 0" in err, err
    assert not out.exists()


def test_duplicate_loss_kinds_are_refused():
    with pytest.raises(ValueError, match=r"losses.kinds.*distinct.*\['D1', 'D1'\]"):
        config_of(SMALL.replace("[losses]", '[losses]\nkinds = ["D1", "D1"]'))


def _worker_pids(parent: int) -> list[int]:
    """The spawned pool workers among ``parent``'s descendants (not the resource tracker)."""
    out = []
    for pid in _descendants(parent):
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_worker_is_reported_as_such_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    proc, cfg, out = _start_cli_sweep(tmp_path)
    workers = _worker_pids(proc.pid)
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == 1, err
    assert lines[-1].startswith("hmoe-sim: error: a worker process died while computing a cell"), err
    assert "cells done" in lines[-1] and "kept, rerun the same command to resume" in lines[-1], err
    assert "internal error" not in err and "Traceback" not in err, err
    assert main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 0  # the rerun resumes
    assert "reused" in capsys.readouterr().out


# ------------------------------------------------------------------- class 3: plans beyond the machine
@pytest.mark.parametrize(("edit", "key", "value"), [
    (lambda t: t.replace('method = "lm"', 'method = "lm"\nrandom_starts = 1000000000'), "fit.random_starts",
     "1000000000"),
    (lambda t: t.replace('method = "lm"', 'method = "lm"\nn_starts = 400000'), "fit.n_starts", "400000"),
    (lambda t: t.replace('structure = "shared"', 'structure = "shared"\nfit = { random_starts = 300000 }'),
     "series[0].fit.random_starts", "300000"),
    (lambda t: t.replace("options = { expert_std = 1.0, gate_slope_std = 1.0 }",
                         "options = { expert_std = 1.0, gate_slope_std = 1.0, key_dim = 10000000 }"),
     "truth.options.key_dim", "10000000"),
    (lambda t: t.replace("options = { expert_std = 1.0, gate_slope_std = 1.0 }",
                         "options = { expert_std = 1.0, gate_slope_std = 1.0, value_dim = 100000000000 }"),
     "truth.options.value_dim", "100000000000"),
])
def test_plans_beyond_the_machine_are_refused_before_work_naming_the_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], edit, key, value):
    no_fits(monkeypatch)
    out = tmp_path / "run"
    started = time.monotonic()
    with deadline(60):
        code = main(["sweep", str(write_toml(tmp_path, edit(SMALL))), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - started < 30, err
    assert err.startswith("hmoe-sim: error:") and err.count("\n") == 1, err
    assert f"'{key}'" in err and value in err, err
    assert not out.exists()


def test_starts_per_fit_enter_the_memory_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A plan within the fit cap whose starts of one cell do not fit in memory is refused naming the starts."""
    config = config_of(SMALL.replace('method = "lm"', 'method = "lm"\nrandom_starts = 20000'))
    one_start = config_of(SMALL)
    monkeypatch.setattr(checks, "cpu_available_memory", lambda: 16 * 1024**2)
    checks.check_before_work(one_start, tmp_path / "a")  # one start per fit fits in 16 MiB
    with pytest.raises(ValueError, match=r"'fit.random_starts'.*20001 starts per fit"):
        checks.check_before_work(config, tmp_path / "b")


def test_threads_beyond_the_cores_are_capped_with_a_notice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch

    import hmoe_sim.sweep.cell as cell_module

    asked: list[int] = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (asked.append(n), real(min(n, 2)))[1])
    cores = cell_module.usable_cores() if hasattr(cell_module, "usable_cores") else os.cpu_count()
    lines: list[str] = []
    outcome = run_sweep(config_of(SMALL.replace('root_seed = 11', 'root_seed = 11\nthreads = 100000')),
                        tmp_path / "run", progress=False, log=lines.append)
    assert outcome.computed == 2
    notice = [m for m in lines if "100000" in m]
    assert len(notice) == 1 and f"{cores} usable cores" in notice[0], lines
    assert asked and max(asked) <= cores, asked


def test_a_scheduler_without_workers_ends_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]):
    distributed = pytest.importorskip("dask.distributed")
    monkeypatch.setattr(backends, "DASK_WORKERS_SECONDS", 1.0, raising=False)
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster, deadline(60):
        code = main(_dask_sweep(tmp_path, tmp_path / "run", cluster.scheduler_address))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("hmoe-sim: error: the dask scheduler at "), err
    assert "has no worker after 1 s" in err[-1] and "0 of 2 cells done" in err[-1], err
