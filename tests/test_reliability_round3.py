"""Reliability, round three: nothing written where it should not be, every plan checked before work.

Files (the package writes only its own files under --out, through a temporary name, never
through a symbolic link), dask schedulers checked before anything is written, plans that the
machine cannot run refused before work, preset options checked alike, and the scikit-learn
estimator contract of the estimators.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_reliability import SMALL, config_of, no_fits, quiet, write_toml

from hmoe_sim.cli import main
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
