"""The command line: a tiny sweep end to end, plot and report, and early config errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import hmoe_sim.sweep.backends as backends
from hmoe_sim.cli import main

MAX_ITER = 3
TOML = """
name = "cli-tiny"
root_seed = 3

[truth]
preset = "hmoe-shared"
seed = 0
options = { expert_std = 1.0, gate_slope_std = 1.0 }

[sample]
sizes = [60, 120]
replications = 2

[fit]
max_iter = 3

[[series]]
name = "nonshared"
structure = "nonshared"

[[series]]
name = "shared"
structure = "shared"

[losses]
l2_n_eval = 300
"""


def test_sweep_plot_report_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(TOML)
    out = tmp_path / "run"
    assert main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "4 cells (0 reused, 4 computed)" in text and "shared" in text and "figure:" in text
    for name in ("results.parquet", "rates.csv", "summary.csv", "config.resolved.json", "cli-tiny.png"):
        assert (out / name).is_file(), name
    assert (out / "cli-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 8 and set(results["series"]) == {"shared", "nonshared"}
    rates = pd.read_csv(out / "rates.csv")
    assert list(rates.columns[:9]) == ["truth", "series", "loss", "axis", "slope", "ci_low", "ci_high", "n_min",
                                       "n_max"]
    assert "verdict" in rates and (rates["verdict"] == "unchecked").all()  # no control, one start
    assert {"rss_power", "rss_log", "preferred"} <= set(rates.columns)
    assert len(rates) == 2 * 3

    assert main(["sweep", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert "4 cells (4 reused, 0 computed)" in capsys.readouterr().out

    png = tmp_path / "figs" / "x.png"
    assert main(["plot", str(out), "--output", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    report = capsys.readouterr().out
    assert "cli-tiny" in report and "nonshared" in report and "flagged" in report
    # fits that stopped at the iteration cap: counted per (series, n) in summary.csv and in the report
    summary = pd.read_csv(out / "summary.csv")
    capped = results.groupby(["series", "n"])["n_iter"].apply(lambda v: int((v >= MAX_ITER).sum()))
    got = summary.set_index(["series", "n"])["n_at_max_iter"]  # no control in this config
    assert got.sort_index().to_dict() == capped.sort_index().to_dict()
    assert f"{int(capped.loc['shared'].sum())} stopped at max_iter" in report


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda t: t + "\nunknown_key = 1\n", "unknown_key"),
        (lambda t: t.replace("sizes = [60, 120]", "sizes = [0, 120]"), "sample.sizes[0]"),
        (lambda t: t.replace("replications = 2", "replications = 1"), "sample.replications"),
        (lambda t: t.replace('preset = "hmoe-shared"', 'preset = "nope"'), "truth.preset"),
    ],
)
def test_bad_config_fails_before_fitting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], edit, needle):
    def never(*args, **kwargs):
        raise AssertionError("a fit was started")

    monkeypatch.setattr(backends, "run_cell", never)
    cfg = tmp_path / "bad.toml"
    cfg.write_text(edit(TOML))
    assert main(["sweep", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("hmoe-sim: error:")
    assert not (tmp_path / "run").exists()


def test_report_on_missing_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a sweep directory" in capsys.readouterr().err
