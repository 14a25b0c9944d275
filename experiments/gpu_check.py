"""The GPU check, one command (issue 13), sized to finish in under 8 minutes on one H200 (not yet
run on one: the session that wrote it had no device).

    python experiments/gpu_check.py                        # on a CUDA machine
    python experiments/gpu_check.py --device cpu --smoke   # the same steps at a smoke size (tests)

Steps, each timed; a failing step is recorded and the next one runs:

1. ``pytest -m gpu`` (the gpu-marked tests);
2. ``experiments/bench_estimators.py --device DEVICE --scipy-sets 0`` (batched LM on the device,
   the batched LM on the CPU in the same run for the ratio, the strong scipy anchor; no
   finite-difference loop);
3. one full-size calibration cell per flat preset (``softmax-linear``, ``sigmoid-regime2``;
   d = 32, k* = 8, k = 9, n = 1e5, 20 replications): data, ``fit_batch``, Voronoi losses, timed;
4. float32 against float64 on the softmax-linear cell: the fitted RSS (both recomputed in
   float64 on the data) and the L2 error of the fitted regression function, not the
   parameters (flat valleys leave those undetermined).

Writes one JSON summary (``--out``, default ``experiments/results/gpu_check/summary.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hmoe_sim import cell_seed, make_preset, sample_batch
from hmoe_sim.estimators import fit_batch, init_near_truth
from hmoe_sim.losses import l2_error, voronoi_losses_for

ROOT = Path(__file__).resolve().parents[1]
#: sizes of the full run and of the CPU smoke run
SIZES: dict[str, dict[str, Any]] = {
    "full": dict(pytest=["-m", "gpu", "tests"], bench_sets=16, bench_n=10_000, bench_max_iter=1000,
                 cell=dict(input_dim=32, n_true=8, n_fit=9), cell_n=100_000, reps=20, max_iter=1000),
    "smoke": dict(pytest=["-m", "gpu", "tests/test_normal_equations.py::test_chunks_stay_under_the_memory_budget_on_"
                                       "cuda"],
                  bench_sets=2, bench_n=300, bench_max_iter=10, cell=dict(input_dim=4, n_true=2, n_fit=3), cell_n=400,
                  reps=3, max_iter=10),
}
CELL_PRESETS = ("softmax-linear", "sigmoid-regime2")
#: the calibration sweeps' fit settings (experiments/configs/calibration_*.toml, sweep defaults)
PERTURBATION, TOL = 0.1, 1e-10


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="smoke sizes (seconds on a CPU)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "gpu_check" / "summary.json"))
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of the benchmark")
    ap.add_argument("--timeout", type=int, default=240, help="seconds allowed to each subprocess step")
    return ap


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def step_tests(args: argparse.Namespace, size: dict[str, Any]) -> dict[str, Any]:
    """The gpu-marked tests in a subprocess: exit status and pytest's summary line."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *size["pytest"]]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=args.timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return {"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": lines[-1] if lines else "",
            "ok": proc.returncode == 0, "failures": [ln for ln in lines if ln.startswith("FAILED")]}


def step_bench(args: argparse.Namespace, size: dict[str, Any]) -> dict[str, Any]:
    """The estimator benchmark on the device (no finite-difference loop); its JSON and last lines."""
    with tempfile.TemporaryDirectory() as tmp:
        return _bench(args, size, Path(tmp) / "bench.json")


def _bench(args: argparse.Namespace, size: dict[str, Any], out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(ROOT / "experiments" / "bench_estimators.py"), "--n-sets", str(size["bench_sets"]),
           "--n", str(size["bench_n"]), "--max-iter", str(size["bench_max_iter"]), "--device", args.device,
           "--threads", str(args.threads), "--scipy-sets", "0", "--no-profile", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=args.timeout)
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": proc.returncode,
                              "stdout": proc.stdout.splitlines()[-40:], "ok": proc.returncode == 0}
    if proc.returncode != 0:
        result["stderr"] = proc.stderr.splitlines()[-20:]
    if out.exists():
        result["numbers"] = json.loads(out.read_text())
    return result


def _cell_data(preset: str, size: dict[str, Any], device: str):
    setup = make_preset(preset, seed=0, **size["cell"])
    seeds = [cell_seed(0, "gpu_check", preset, size["cell_n"], r) for r in range(size["reps"])]
    X, y = sample_batch(setup.true_model, setup.truth, size["cell_n"], setup.noise_std, seeds, device=device)
    init = init_near_truth(setup.fit_model, setup.true_model, setup.truth, batch_shape=size["reps"],
                           perturbation=PERTURBATION, seed=1, device=device)
    return setup, X, y, init


def _rss64(model, params, X, y) -> torch.Tensor:
    """RSS of fitted parameters, recomputed in float64 on the data."""
    p64 = model.cast(params, dtype=torch.float64)
    return (y.double() - model.predict(p64, X.double(), check=False)).square().sum(-1)


def step_cell(args: argparse.Namespace, size: dict[str, Any], keep: dict[str, Any]) -> dict[str, Any]:
    """One full-size calibration cell per flat preset, timed phase by phase."""
    out: dict[str, Any] = {}
    dev = args.device
    for preset in CELL_PRESETS:
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        setup, X, y, init = _cell_data(preset, size, dev)
        _sync(dev)
        t1 = time.perf_counter()
        res = fit_batch(setup.fit_model, X, y, init, truth=setup.truth, max_iter=size["max_iter"], tol=TOL)
        _sync(dev)
        t2 = time.perf_counter()
        losses = voronoi_losses_for(setup.fit_model, res.params, setup.true_model, setup.truth)
        _sync(dev)
        t3 = time.perf_counter()
        n_iter = res.n_iter.cpu()
        P, n = setup.fit_model.n_params, size["cell_n"]
        out[preset] = {
            "P": P, "n": n, "replications": size["reps"], "sample_s": t1 - t0, "fit_s": t2 - t1,
            "losses_s": t3 - t2, "total_s": t3 - t0, "converged": int(res.converged.sum()),
            "on_boundary": int(res.on_boundary.sum()), "diverged": int(res.diverged.sum()),
            "iterations_median": float(n_iter.double().median()), "iterations_max": int(n_iter.max()),
            "iterations_total": int(n_iter.sum()),
            "effective_gflops": float(n_iter.sum()) / (t2 - t1) * 2 * n * P * P / 1e9,
            "risk_minus_risk_truth_max": float((res.risk - res.risk_truth).max()),
            "D1_median": float(losses["D1"].median()), "D2_median": float(losses["D2"].median()),
        }
        if dev.startswith("cuda"):
            out[preset]["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        if preset == "softmax-linear":
            keep.update(setup=setup, X=X, y=y, init=init, result=res)
    return out


def step_precision(args: argparse.Namespace, size: dict[str, Any], keep: dict[str, Any]) -> dict[str, Any]:
    """float32 against float64 on the softmax-linear cell: fitted RSS and L2 error of f."""
    if "result" in keep:
        setup, X, y, init, r64 = keep["setup"], keep["X"], keep["y"], keep["init"], keep["result"]
    else:
        setup, X, y, init = _cell_data("softmax-linear", size, args.device)
        r64 = fit_batch(setup.fit_model, X, y, init, max_iter=size["max_iter"], tol=TOL)
    model = setup.fit_model
    _sync(args.device)
    t0 = time.perf_counter()
    r32 = fit_batch(model, X, y, init, dtype=torch.float32, max_iter=size["max_iter"], tol=TOL)
    _sync(args.device)
    t32 = time.perf_counter() - t0
    rss64, rss32 = _rss64(model, r64.params, X, y), _rss64(model, r32.params, X, y)
    rel_rss = ((rss32 - rss64) / rss64).cpu().numpy()
    l2_64 = l2_error(model, model.cast(r64.params, dtype=torch.float64), setup.truth).cpu().numpy()
    l2_32 = l2_error(model, model.cast(r32.params, dtype=torch.float64), setup.truth).cpu().numpy()
    rel_l2 = (l2_32 - l2_64) / l2_64
    reported = (r32.risk.double() * r32.n.double()).cpu().numpy()
    return {
        "float32_fit_s": t32, "float32_converged": int(r32.converged.sum()),
        "float32_diverged": int(r32.diverged.sum()),
        "float32_iterations_median": float(r32.n_iter.double().median()),
        "rss_rel_diff_max_abs": float(np.abs(rel_rss).max()), "rss_rel_diff_median": float(np.median(rel_rss)),
        "float32_lower_rss": int((rel_rss < 0).sum()),
        "l2_float64_median": float(np.median(l2_64)), "l2_float32_median": float(np.median(l2_32)),
        "l2_rel_diff_max_abs": float(np.abs(rel_l2).max()), "l2_rel_diff_median": float(np.median(rel_l2)),
        "float32_reported_rss_rel_error_max": float(np.abs(reported / rss32.cpu().numpy() - 1).max()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here; use --device cpu --smoke for the smoke run")
    size = SIZES["smoke" if args.smoke else "full"]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "device": args.device, "smoke": args.smoke, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
        "steps": {},
    }
    keep: dict[str, Any] = {}
    t_start = time.perf_counter()
    steps = [("gpu_tests", lambda: step_tests(args, size)),
             ("bench", lambda: step_bench(args, size)),
             ("calibration_cell", lambda: step_cell(args, size, keep)),
             ("float32_vs_float64", lambda: step_precision(args, size, keep))]
    for name, run in steps:
        t0 = time.perf_counter()
        try:
            result = run()
        except Exception as err:  # a failing step is recorded; the others still run
            result = {"ok": False, "error": repr(err), "traceback": traceback.format_exc().splitlines()[-8:]}
        result["wall_s"] = time.perf_counter() - t0
        summary["steps"][name] = result
        print(f"{name}: {result['wall_s']:.1f} s, ok={result.get('ok', 'error' not in result)}", flush=True)
        out_path.write_text(json.dumps(summary, indent=1))
    summary["wall_s"] = time.perf_counter() - t_start
    out_path.write_text(json.dumps(summary, indent=1))
    print(f"wrote {out_path} ({summary['wall_s']:.1f} s)")
    return summary


if __name__ == "__main__":
    main()
