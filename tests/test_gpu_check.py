"""experiments/gpu_check.py at its CPU smoke size: every step runs and the JSON summary has its numbers."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "experiments" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_smoke_run_on_cpu_writes_a_complete_summary(tmp_path):
    out = tmp_path / "summary.json"
    returned = _load_script().main(["--device", "cpu", "--smoke", "--threads", "1", "--out", str(out)])
    summary = json.loads(out.read_text())
    assert summary == json.loads(json.dumps(returned))
    steps = summary["steps"]
    assert list(steps) == ["gpu_tests", "bench", "calibration_cell", "float32_vs_float64"]
    for name, step in steps.items():
        assert "error" not in step, (name, step.get("traceback"))
    # the gpu-marked test is selected and skipped without a device
    assert steps["gpu_tests"]["ok"] and "1 skipped" in steps["gpu_tests"]["summary"]
    bench = steps["bench"]["numbers"]
    assert bench["n_sets"] == 2 and bench["device"] == "cpu"
    assert "fd_s_extrapolated" not in bench  # the finite-difference loop is skipped
    assert steps["bench"]["stdout"][-1].startswith("speedup strong anchor")
    for key in ("ratio_anchor", "effective_gflops", "matmul_gflops", "roofline_fraction"):
        assert math.isfinite(bench[key]) and bench[key] > 0
    assert math.isclose(bench["roofline_fraction"], bench["effective_gflops"] / bench["matmul_gflops"])
    for preset in ("softmax-linear", "sigmoid-regime2"):
        cell = steps["calibration_cell"][preset]
        assert cell["replications"] == 3 and cell["diverged"] == 0
        assert cell["iterations_total"] == 3 * 10  # smoke: 10 iterations per fit, none converged this early
        assert cell["fit_s"] > 0 and math.isfinite(cell["D1_median"])
    precision = steps["float32_vs_float64"]
    # the same start and data: after 10 iterations the two precisions' fits are close in RSS and in f
    assert precision["float32_diverged"] == 0
    assert precision["rss_rel_diff_max_abs"] < 1e-3
    assert precision["l2_rel_diff_max_abs"] < 1e-2
    assert precision["float32_reported_rss_rel_error_max"] < 1e-5
