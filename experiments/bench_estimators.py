"""Benchmark: batched LM (hmoe-sim) against scipy.optimize.least_squares, and its roofline.

Setup (issue 4): flat softmax MoE with linear experts and one known anchor expert
(preset ``softmax-linear``), D = 8, k* = 2 true atoms, k = 3 fitted, near-truth starts;
the same data sets, starts, box and tolerance for every method. ``--model hmoe-shared`` /
``hmoe-nonshared`` (issue 18) fit the headline HMoE truth (``hora_truths`` truth 1: H = 2, D = 4,
L* = 1, L = 2) with the shared (HoRA, P = 30) or the non-shared (MH-LoRA, P = 40) structure, the
anchor's NumPy model being ``numpy_hmoe.py``. Three methods, one run:

(a) the batched projected LM of hmoe-sim (``fit_batch``);
(b) the strong anchor: ``least_squares`` (trf) with an exact NumPy Jacobian, one fit per
    process in a pool of ``--threads`` processes with one BLAS thread each, on every data set;
(c) a loop of ``least_squares`` (trf) with a 2-point finite-difference Jacobian on the first
    ``--scipy-sets`` data sets (default 2), its time extrapolated to all of them.

The roofline line compares the fit's effective rate (problem-iterations/s x 2 n P^2) with a
same-shape batched ``J^T J`` matmul on the same device and dtype. The last line printed is
the speedup over the strong anchor.

    python experiments/bench_estimators.py --n-sets 16 --n 10000 --threads 2
    python experiments/bench_estimators.py --model hmoe-shared --n-sets 16 --n 10000 --threads 2
    python experiments/bench_estimators.py --n-sets 16 --n 10000 --device cuda --scipy-sets 0
    python experiments/bench_estimators.py --memory-only           # peak memory at d=32, k=9, n=1e5
    python experiments/bench_estimators.py --scaling-only 181       # fits/s against n and batch

``--threads`` sets the threads of every method (torch intra-op threads; OpenBLAS/OpenMP/MKL
threads of NumPy and SciPy, through the environment before NumPy loads; the anchor's pool size).
``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` (set it in the environment to override).
With ``--device cuda`` the batched LM also runs on the CPU in the same run, for the ratio.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

MODELS = ("softmax-linear", "hmoe-shared", "hmoe-nonshared")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="softmax-linear", choices=MODELS,
                    help="the fitted model: the flat benchmark, or the headline HMoE truth fitted shared (HoRA) or "
                         "non-shared (MH-LoRA)")
    ap.add_argument("--n-sets", type=int, default=64)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=("float64", "float32"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for every method and processes of the anchor's pool (default: all cores)")
    ap.add_argument("--scipy-sets", type=int, default=2,
                    help="run the finite-difference scipy loop on the first m data sets only and extrapolate "
                         "its time (0: skip it)")
    ap.add_argument("--repeat", type=int, default=1, metavar="K",
                    help="time the batched LM, the matmul and the strong anchor K times each and report medians "
                         "(with their range): single runs vary by 8-10%% on a shared 2-core machine")
    ap.add_argument("--max-memory", type=int, default=None, metavar="BYTES",
                    help="memory budget of the batched LM's chunks (fit_batch max_memory)")
    ap.add_argument("--reference-rss", metavar="JSON",
                    help="per-fit RSS of an earlier batched run ({'rss': [...]}) to compare with (1e-10 relative)")
    ap.add_argument("--save-rss", metavar="JSON", help="write this run's batched per-fit RSS and iterations")
    ap.add_argument("--json", metavar="PATH", help="also write the measured numbers as JSON")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled share of time outside torch")
    ap.add_argument("--profile-table", type=int, metavar="ROWS", default=0,
                    help="also print the top ROWS operators (by input shape) of 20 profiled LM iterations")
    ap.add_argument("--profile-only", action="store_true", help="only the profile table (ROWS default 14)")
    ap.add_argument("--scaling", action="store_true", help="also fits/s against n and batch size")
    ap.add_argument("--scaling-only", type=float, metavar="ITERS_PER_FIT", default=None,
                    help="only the scaling table, fits/s computed with this many LM iterations per fit")
    ap.add_argument("--memory", action="store_true",
                    help="also peak memory at the papers' full size (d=32, k*=8, k=9, n=1e5)")
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory report")
    ap.add_argument("--memory-n", type=int, default=100_000, help=argparse.SUPPRESS)
    ap.add_argument("--scaling-point", nargs=2, type=int, metavar=("N", "BATCH"), help=argparse.SUPPRESS)
    ap.add_argument("--memory-point", nargs=2, type=int, metavar=("BATCH", "BUDGET"), help=argparse.SUPPRESS)
    return ap


if __name__ == "__main__":
    # before NumPy loads; the anchor's worker processes (spawned, __name__ != "__main__") keep the
    # one-thread environment they are started with
    ARGS = _parser().parse_args()
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = str(ARGS.threads)
    # OpenMP threads that sleep at a barrier instead of spinning: on a shared machine a spinning
    # thread can wait for a descheduled sibling for its whole time slice
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import multiprocessing  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import least_squares  # noqa: E402

from hmoe_sim import make_preset, sample_batch  # noqa: E402
from hmoe_sim.estimators import Bounds, auto_chunk_size, fit_batch, init_near_truth  # noqa: E402
from hmoe_sim.models.hmoe import HMoE  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from numpy_hmoe import HMoEResidual, HMoESpec  # noqa: E402

SCALING_ITERS = 20
#: the papers' full size (theory.md section 6) for the memory report
FULL_SIZE = dict(input_dim=32, n_true=8, n_fit=9)
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ------------------------------------------------------------------ scipy: the model in NumPy
def numpy_model(model, anchors):
    """What a user would write: the same regression function in NumPy (softmax via logsumexp)."""
    k, d = model.n_atoms, model.input_dim
    ab0, ab1, aa, ab = (anchors[n] for n in ("beta0", "beta1", "a", "b"))

    def f(theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        beta0, beta1 = theta[:k], theta[k : k + k * d].reshape(k, d)
        a, b = theta[k + k * d : k + 2 * k * d].reshape(k, d), theta[k + 2 * k * d :]
        logits = np.concatenate([X @ ab1.T + ab0, X @ beta1.T + beta0], axis=1)
        experts = np.concatenate([X @ aa.T + ab, X @ a.T + b], axis=1)
        m = logits.max(axis=1, keepdims=True)
        w = np.exp(logits - m)
        return (w * experts).sum(1) / w.sum(1)

    return f


class AnalyticResidual:
    """Residual ``f(theta; X) - y`` of the softmax-linear model and its exact Jacobian, in NumPy.

    What a careful user would write: the Jacobian columns from ``df/dl_j = p_j (e_j - f)`` and
    ``df/du_j = p_j`` (``p`` the softmax over anchor and free atoms, ``e`` the experts), and the
    softmax of the last point kept, since ``least_squares`` asks for the Jacobian at the point
    whose residual it has just evaluated.
    """

    def __init__(self, k: int, d: int, anchors: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> None:
        self.k, self.d, self.X, self.y = k, d, X, y
        self.anchor_logits = X @ anchors["beta1"].T + anchors["beta0"]
        self.anchor_experts = X @ anchors["a"].T + anchors["b"]
        self.anchors = anchors
        self._last: tuple[bytes, tuple[np.ndarray, ...]] | None = None

    def head(self, m: int) -> AnalyticResidual:
        """The same problem on the first ``m`` samples."""
        return AnalyticResidual(self.k, self.d, self.anchors, self.X[:m], self.y[:m])

    def _parts(self, theta: np.ndarray) -> tuple[np.ndarray, ...]:
        key = theta.tobytes()
        if self._last is None or self._last[0] != key:
            k, d, X = self.k, self.d, self.X
            beta0, beta1 = theta[:k], theta[k : k + k * d].reshape(k, d)
            a, b = theta[k + k * d : k + 2 * k * d].reshape(k, d), theta[k + 2 * k * d :]
            logits = np.concatenate([self.anchor_logits, X @ beta1.T + beta0], axis=1)
            experts = np.concatenate([self.anchor_experts, X @ a.T + b], axis=1)
            w = np.exp(logits - logits.max(axis=1, keepdims=True))
            f = (w * experts).sum(1) / w.sum(1)
            m = self.anchor_logits.shape[1]
            p = w[:, m:] / w.sum(1, keepdims=True)
            self._last = (key, (f, p, experts[:, m:]))
        return self._last[1]

    def residual(self, theta: np.ndarray) -> np.ndarray:
        return self._parts(theta)[0] - self.y

    def jacobian(self, theta: np.ndarray) -> np.ndarray:
        f, p, e = self._parts(theta)
        k, d, X = self.k, self.d, self.X
        d_logit, d_pre = p * (e - f[:, None]), p
        J = np.empty((X.shape[0], k * (2 * d + 2)))
        J[:, :k] = d_logit
        J[:, k : k + k * d] = (d_logit[:, :, None] * X[:, None, :]).reshape(-1, k * d)
        J[:, k + k * d : k + 2 * k * d] = (d_pre[:, :, None] * X[:, None, :]).reshape(-1, k * d)
        J[:, k + 2 * k * d :] = d_pre
        return J


def _at_bound(x: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[str]:
    return [f"theta[{j}]" for j in np.nonzero((x <= lo + 1e-6 * (1 + abs(lo))) | (x >= hi - 1e-6 * (1 + abs(hi))))[0]]


def anchor_fit(task: tuple) -> tuple[float, int, int, float, list[str], float]:
    """One ``least_squares`` fit with the exact Jacobian: (RSS, nfev, status, seconds, at bound,
    CPU seconds of the worker)."""
    res_fn, theta0, lo, hi, tol = task
    t0, c0 = time.perf_counter(), time.process_time()
    res = least_squares(res_fn.residual, theta0, jac=res_fn.jacobian, bounds=(lo, hi), ftol=tol, xtol=tol,
                        gtol=tol, method="trf")
    return (2 * res.cost, int(res.nfev), int(res.status), time.perf_counter() - t0, _at_bound(res.x, lo, hi),
            time.process_time() - c0)


def anchor_costs(task: tuple, reps: int = 10) -> tuple[float, float, float]:
    """Milliseconds (CPU, this worker) of one residual, one Jacobian and one SVD of the ``n x P``
    Jacobian (what trf's exact trust-region solver does every iteration) at the start of ``task``."""
    res_fn, theta0 = task[:2]
    out = []
    for what in ("residual", "jacobian", "svd"):
        J = res_fn.jacobian(theta0)
        c0 = time.process_time()
        for _ in range(reps):
            if what == "residual":
                res_fn._last = None
                res_fn.residual(theta0)
            elif what == "jacobian":
                res_fn.jacobian(theta0)
            else:
                np.linalg.svd(J, full_matrices=False)
        out.append((time.process_time() - c0) / reps * 1e3)
    return out[0], out[1], out[2]


def run_anchor(tasks: list[tuple], processes: int, repeat: int = 1
               ) -> tuple[list[tuple], list[float], list[float], tuple[float, float, float]]:
    """The anchor on every data set, one fit per task in a pool of ``processes`` spawned workers with
    one BLAS/OpenMP thread each, ``repeat`` times: the fits of the last run, and the wall seconds and
    the CPU seconds (all workers) of every run. The pool is started and warmed up (one short fit per
    worker) before the clock starts, as the batched LM is warmed up before its own."""
    saved = {v: os.environ.get(v) for v in _THREAD_VARS}
    os.environ.update({v: "1" for v in _THREAD_VARS})
    try:
        pool = multiprocessing.get_context("spawn").Pool(processes)
    finally:
        for v, val in saved.items():
            if val is None:
                os.environ.pop(v, None)
            else:
                os.environ[v] = val
    with pool:
        warm = [(t[0].head(50), *t[1:]) for t in tasks[:1]] * processes
        pool.map(anchor_fit, warm, chunksize=1)
        costs = pool.apply(anchor_costs, (tasks[0],))
        walls, cpus = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = pool.map(anchor_fit, tasks, chunksize=1)
            walls.append(time.perf_counter() - t0)
            cpus.append(sum(fit[5] for fit in out))
        return out, walls, cpus, costs


def run_fd_loop(residuals, theta0, lo, hi, tol):
    """One ``least_squares`` per data set (``residuals[b](theta)``), 2-point Jacobian: (RSS, nfev,
    status, seconds, at bound)."""
    out, t0 = [], time.perf_counter()
    for b, fun in enumerate(residuals):
        t1 = time.perf_counter()
        res = least_squares(fun, theta0[b], bounds=(lo, hi),
                            ftol=tol, xtol=tol, gtol=tol, method="trf")
        out.append((2 * res.cost, res.nfev, res.status, time.perf_counter() - t1, _at_bound(res.x, lo, hi)))
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------ timing helpers
def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def timed_fit(model, X, y, init, device: str, dtype: torch.dtype, **kwargs):
    """Warm up on one problem, then time ``fit_batch`` on all of them: (result, seconds, CPU seconds
    of this process, all its threads)."""
    Xd, yd = X.to(device, dtype), y.to(device, dtype)
    initd = model.cast(init, device=device, dtype=dtype)
    fit_batch(model, Xd[:1], yd[:1], {k: v[:1] for k, v in initd.items()}, max_iter=2)
    _sync(device)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit_batch(model, Xd, yd, initd, **kwargs)
    _sync(device)
    return res, time.perf_counter() - t0, time.process_time() - c0


def _spread(values: list[float], unit: str) -> str:
    """``"2.47 s"`` for one value; ``"median 2.47 s of 5 runs (2.40..2.61)"`` for several."""
    if len(values) == 1:
        return f"{values[0]:.2f}{unit}"
    return f"median {np.median(values):.2f}{unit} of {len(values)} runs ({min(values):.2f}..{max(values):.2f})"


def matmul_rate(batch: int, n: int, P: int, device: str, dtype: torch.dtype, reps: int = 5) -> float:
    """GFLOP/s of the same-shape batched ``J^T J``: ``(batch, P, n) @ (batch, n, P)``, best of ``reps``."""
    Jt = torch.randn(batch, P, n, dtype=dtype, device=device)
    Jt @ Jt.mT
    _sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        Jt @ Jt.mT
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * P * P * batch / best / 1e9


def _peak_rss_mib() -> float:
    """This process's peak resident memory: ``VmHWM`` (reset by exec, unlike ``ru_maxrss``,
    which a child started by ``subprocess`` inherits from its parent)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(args: argparse.Namespace, *extra: str) -> list[str]:
    cmd = [sys.executable, __file__, *extra, "--device", args.device, "--threads", str(args.threads),
           "--dtype", args.dtype]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()


# ------------------------------------------------------------------ scaling
def scaling_point(n: int, batch: int, device: str) -> tuple[float, float]:
    """LM iterations per second (summed over the batch) and this process's peak memory (MiB).

    ``SCALING_ITERS`` LM iterations with every fit kept active (``tol`` far below reach), so
    the figure is the cost of one iteration; fits/s = this / iterations per fit.
    """
    setup = make_preset("softmax-linear")
    model = setup.fit_model
    X, y = sample_batch(setup.true_model, setup.truth, n, setup.noise_std, list(range(batch)), device=device)
    init = init_near_truth(model, setup.true_model, setup.truth, batch_shape=batch, seed=1, device=device)
    res, wall, _ = timed_fit(model, X, y, init, device, X.dtype, max_iter=SCALING_ITERS, tol=1e-300)
    peak = _peak_rss_mib() if device == "cpu" else torch.cuda.max_memory_allocated() / 2**20
    return float(res.n_iter.sum()) / wall, peak


def scaling_table(args: argparse.Namespace, median_iters: float) -> None:
    """Each point in a fresh process, so that its peak memory is its own."""
    print(f"scaling ({SCALING_ITERS} LM iterations per point, each point a fresh process; fits/s assumes "
          f"{median_iters:.0f} iterations per fit, the median of the main run; load average "
          f"{os.getloadavg()[0]:.2f}):")
    print(f"  {'n':>7} {'batch':>5} {'iterations/s':>13} {'fits/s':>8} {'peak MiB':>9}")
    points = [(n, 16) for n in (1_000, 10_000, 100_000)] + [(1_000, b) for b in (1, 16, 64, 256)]
    for n, batch in dict.fromkeys(points):
        out = _child(args, "--scaling-point", str(n), str(batch))
        rate, peak = float(out[-2]), float(out[-1])
        print(f"  {n:>7} {batch:>5} {rate:>13.1f} {rate / median_iters:>8.2f} {peak:>9.0f}")


# ------------------------------------------------------------------ memory at full size
def memory_point(batch: int, budget: int, device: str, dtype: torch.dtype, n: int) -> tuple[float, float, int]:
    """Peak memory (MiB) of 2 LM iterations on ``batch`` full-size problems under ``budget`` bytes
    (0: the default budget), the memory before the fit (data, model; MiB) and the chunk size."""
    setup = make_preset("softmax-linear", **FULL_SIZE)
    model = setup.fit_model
    X, y = sample_batch(setup.true_model, setup.truth, n, setup.noise_std, list(range(batch)), device=device,
                        dtype=dtype)
    init = init_near_truth(model, setup.true_model, setup.truth, batch_shape=batch, seed=1, device=device,
                           dtype=dtype)
    max_memory = budget or None
    dev = torch.device(device)
    chunk = auto_chunk_size(n, model.n_params, dtype, dev, analytic=True, max_memory=max_memory)
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = _peak_rss_mib() if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    fit_batch(model, X, y, init, max_iter=2, tol=1e-300, max_memory=max_memory)
    peak = _peak_rss_mib() if device == "cpu" else torch.cuda.max_memory_allocated() / 2**20
    return peak, before, min(chunk, batch)


def memory_report(args: argparse.Namespace) -> dict[str, float]:
    """Peak memory per fit and per batch of 20 (the calibration cell) at d=32, k*=8, k=9."""
    setup = make_preset("softmax-linear", **FULL_SIZE)
    P, n = setup.fit_model.n_params, args.memory_n
    itemsize = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    jac_mib = n * P * itemsize / 2**20
    budget = args.max_memory or 0
    kind = "peak RSS of the process" if args.device == "cpu" else "peak allocated GPU memory"
    print(f"memory at the papers' full size (softmax-linear d=32 k*=8 k=9 P={P}, n={n}, {args.dtype}, "
          f"{args.device}; 2 LM iterations and the certificate, each case a fresh process; {kind}; "
          f"one n x P Jacobian is {jac_mib:.0f} MiB):")
    out: dict[str, float] = {}
    for batch, label in ((1, "per fit"), (20, "per batch of 20")):
        words = _child(args, "--memory-point", str(batch), str(budget), "--memory-n", str(n))
        peak, before, chunk = float(words[-3]), float(words[-2]), int(words[-1])
        stated = f"max_memory {budget / 2**30:.2f} GiB" if budget else "default budget"
        print(f"  {label:>16}: peak {peak:8.0f} MiB (before the fit: {before:.0f} MiB of data and libraries); "
              f"{stated}, chunks of {chunk}")
        out[f"peak_mib_batch{batch}"] = peak
        out[f"before_mib_batch{batch}"] = before
        out[f"chunk_batch{batch}"] = chunk
    return out


# ------------------------------------------------------------------ reporting
def _agreement(name_a: str, rss_a: np.ndarray, name_b: str, rss_b: np.ndarray, detail) -> None:
    rel = np.abs(rss_a - rss_b) / rss_b
    differ = np.nonzero(rel > 1e-6)[0]
    print(f"    objective {name_a} vs {name_b} on {len(rss_b)} fits: max relative difference {rel.max():.2e}; "
          f"fits differing by > 1e-6: {len(differ)} (lower objective: {name_a} "
          f"{int((rss_a[differ] < rss_b[differ]).sum())}, {name_b} {int((rss_a[differ] > rss_b[differ]).sum())})")
    for b in differ:
        better = name_a if rss_a[b] < rss_b[b] else name_b
        print(f"      fit {b}: RSS {name_a} {rss_a[b]:.10g} {name_b} {rss_b[b]:.10g} (lower: {better}); {detail(b)}")


def outside_share(model, X, y, init, max_iter):
    """Share of wall time not spent inside torch operators (profiler self-times of aten ops)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if X.is_cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fit_batch(model, X, y, init, max_iter=max_iter)
        wall = time.perf_counter() - t0
    inside = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")) / 1e6
    return max(0.0, 1 - inside / wall), wall


def profile_table(model, X, y, init, rows: int, max_iter: int = 20) -> None:
    """Top operators of ``max_iter`` LM iterations (``fit_batch``, certificate included) by self
    time, grouped by operator and input shapes, as shares of the profiled operator time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if X.is_cuda else [])
    with profile(activities=acts, record_shapes=True) as prof:
        fit_batch(model, X, y, init, max_iter=max_iter, tol=1e-300)
    events = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    by_op: dict[str, float] = {}
    for e in events:
        by_op[e.key] = by_op.get(e.key, 0.0) + e.self_cpu_time_total
    print(f"profile ({max_iter} LM iterations and the certificate, {total / 1e6:.2f} s of aten self time):")
    print("  by operator: " + ", ".join(f"{k[6:]} {v / total:.0%}" for k, v in
                                       sorted(by_op.items(), key=lambda kv: -kv[1])[:8]))
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        shapes = " ".join(str(list(s)) for s in e.input_shapes if s)
        print(f"  {e.key[6:]:>10} {e.self_cpu_time_total / total:6.1%} {e.count:5d} calls  {shapes}")


#: the headline truth (experiments/configs/hora_truths.toml, truth 1) for the HMoE models
HMOE_TRUTH = dict(expert_std=2.0, gate_slope_std=2.0, attention_std=0.3, code_activation="identity", noise_std=0.05)
HMOE_TRUTH_SEED = 1


def bench_setup(name: str, seed: int):
    """``(setup, fitted model, model and truth the starts are split from)`` of ``--model name``.

    ``softmax-linear``: the preset with truth ``seed``. ``hmoe-shared`` / ``hmoe-nonshared``: the
    headline's shared truth (seed 1 of ``hora_truths``), fitted with the shared (HoRA) or the
    non-shared (MH-LoRA) structure; a non-shared fit starts near the truth's generated atoms, as in
    the sweep (``series_setup``).
    """
    if name == "softmax-linear":
        setup = make_preset(name, seed=seed)
        return setup, setup.fit_model, setup.true_model, setup.truth
    setup = make_preset("hmoe-shared", seed=HMOE_TRUTH_SEED, **HMOE_TRUTH)
    if name == "hmoe-shared":
        return setup, setup.fit_model, setup.true_model, setup.truth
    return (setup, setup.fit_model.with_structure("nonshared"), setup.true_model.with_structure("nonshared"),
            setup.true_model.to_nonshared(setup.truth))


def bench_problems(name: str, seed: int, n: int, n_sets: int):
    """``(setup, fitted model, X, y, starts)``: ``n_sets`` data sets of ``n`` samples of ``--model name``
    (seeds ``(seed, b)``) and their near-truth starts (perturbation 0.1, seed ``seed``)."""
    setup, model, start_model, start_truth = bench_setup(name, seed)
    X, y = sample_batch(setup.true_model, setup.truth, n, setup.noise_std,
                        [np.random.SeedSequence([seed, b]) for b in range(n_sets)])
    init = init_near_truth(model, start_model, start_truth, batch_shape=n_sets, perturbation=0.1, seed=seed)
    return setup, model, X, y, init


def describe(name: str, setup, model) -> str:
    if name == "softmax-linear":
        return f"softmax-linear D={model.input_dim} k*={setup.true_model.n_atoms} k={model.n_atoms}"
    return (f"{name} (headline truth {HMOE_TRUTH_SEED}: shared, H={model.n_heads}, D={model.input_dim}, "
            f"L*={setup.true_model.n_adapters}; fitted {model.structure}, L={model.n_adapters})")


def numpy_residual(model, X: np.ndarray, y: np.ndarray):
    """The anchor's NumPy residual with its exact Jacobian for one data set."""
    if isinstance(model, HMoE):
        return HMoEResidual(HMoESpec.of(model), X, y)
    return AnalyticResidual(model.n_atoms, model.input_dim, {k: v.numpy() for k, v in model.anchors.items()}, X, y)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.repeat < 1:
        raise SystemExit(f"--repeat must be at least 1, got {args.repeat}")
    if args.scaling_point:
        rate, peak = scaling_point(*args.scaling_point, args.device)
        print(rate, peak)
        return
    if args.memory_point:
        peak, before, chunk = memory_point(*args.memory_point, args.device, dtype, args.memory_n)
        print(peak, before, chunk)
        return
    if args.scaling_only is not None:
        scaling_table(args, args.scaling_only)
        return
    if args.memory_only:
        summary = memory_report(args)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"memory": summary}, fh, indent=1)
        return
    summary: dict[str, object] = {"model": args.model}
    setup, model, X, y, init = bench_problems(args.model, args.seed, args.n, args.n_sets)
    box = Bounds()
    lo, hi = (v.numpy() for v in box.vectors(model))
    B, n, P = args.n_sets, args.n, model.n_params
    if args.profile_only:
        print(f"setup: {args.model} P={P} n={n} data sets={B} device={args.device} dtype={args.dtype} "
              f"threads {torch.get_num_threads()} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}); "
              f"load average {os.getloadavg()[0]:.2f}")
        profile_table(model, X.to(args.device, dtype), y.to(args.device, dtype),
                      model.cast(init, device=args.device, dtype=dtype), args.profile_table or 14)
        return
    print(f"setup: {describe(args.model, setup, model)} P={P} n={n} data sets={B} tol={args.tol} "
          f"device={args.device} dtype={args.dtype}")
    print(f"threads: torch {torch.get_num_threads()} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), "
          f"NumPy/SciPy BLAS (OPENBLAS_NUM_THREADS) {os.environ['OPENBLAS_NUM_THREADS']}; cores {os.cpu_count()}; "
          f"load average before the run {os.getloadavg()[0]:.2f}")
    if args.device == "cpu":
        try:
            from hmoe_sim.estimators._lm import MIN_SAMPLES_PER_WORKER, worker_threads
        except ImportError:  # a library before the worker threads (experiments/bench_hmoe_versions.sh)
            MIN_SAMPLES_PER_WORKER, worker_threads = 0, lambda *_: 1
        parts = worker_threads(torch.get_num_threads(), args.n_sets, args.n)
        print(f"batched LM on the CPU: {parts} worker thread(s) of one torch thread each, sharing a queue of the "
              f"problems (fit_batch's default workers = torch's {torch.get_num_threads()} threads, at least "
              f"{MIN_SAMPLES_PER_WORKER} samples each)" if parts > 1 else
              f"batched LM on the CPU: one stack with torch's {torch.get_num_threads()} thread(s)")
    fit_kw: dict[str, object] = dict(max_iter=args.max_iter, tol=args.tol)
    if args.max_memory is not None:
        fit_kw["max_memory"] = args.max_memory

    # (a) batched LM, --repeat times (the same fits each time: checked)
    runs = [timed_fit(model, X, y, init, args.device, dtype, **fit_kw) for _ in range(args.repeat)]
    res = runs[0][0]
    rss_batched = (res.risk * res.n).double().cpu().numpy()
    changed = [i for i, run in enumerate(runs) if not torch.equal(run[0].risk, res.risk)]
    if changed:
        print(f"    WARNING: runs {changed} gave other risks than run 0 (the fits should not depend on the run)")
    t_runs, cpu_runs = [run[1] for run in runs], [run[2] for run in runs]
    t_batched, cpu_batched = float(np.median(t_runs)), float(np.median(cpu_runs))
    n_iter = res.n_iter.cpu()
    total_iter = int(n_iter.sum())
    print(f"(a) batched LM: {_spread(t_runs, ' s')} ({cpu_batched:.2f} CPU s), "
          f"converged {int(res.converged.sum())}/{B}, on boundary {int(res.on_boundary.sum())}, "
          f"iterations median {int(n_iter.median())} max {int(n_iter.max())} total {total_iter}")
    kinds: dict[str, int] = {}
    for labels in res.boundary_params:
        for label in labels:
            kinds[label] = kinds.get(label, 0) + 1
    print(f"    bounds hit (fits per label): {kinds or 'none'}")
    if hasattr(res, "stop_reasons"):  # libraries since the certificate names the stopping test
        reasons = collections.Counter(res.stop_reasons)
        print(f"    stopped by (fits per test): {dict(sorted(reasons.items()))}")
    if args.device == "cpu":
        print(f"    peak memory (process peak RSS after (a)): {_peak_rss_mib():.0f} MiB")
    else:
        print(f"    peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    summary.update(device=args.device, dtype=args.dtype, n_sets=B, n=n, P=P, threads=args.threads,
                   batched_s=t_batched, iterations_total=total_iter, converged=int(res.converged.sum()))
    if args.reference_rss:
        with open(args.reference_rss) as fh:
            reference = json.load(fh)
        ref = np.asarray(reference["rss"], dtype=float)
        ref_iter = reference.get("n_iter", [None] * len(ref))
        rel = (rss_batched - ref) / ref
        moved = np.nonzero(np.abs(rel) > 1e-10)[0]
        print(f"    against the reference RSS ({args.reference_rss}): max relative difference "
              f"{np.abs(rel).max():.2e}; fits moved by > 1e-10: {moved.tolist() or 'none'}")
        for b in moved:
            print(f"      fit {b}: RSS {rss_batched[b]:.12g} reference {ref[b]:.12g} (relative {rel[b]:+.2e}); "
                  f"iterations {int(n_iter[b])} (reference {ref_iter[b]}); converged={bool(res.converged[b])} "
                  f"bounds={','.join(res.boundary_params[b]) or '-'}")
        summary["reference_max_rel"] = float(rel.max())
    if args.save_rss:
        with open(args.save_rss, "w") as fh:
            json.dump({"rss": rss_batched.tolist(), "n_iter": n_iter.tolist()}, fh, indent=1)

    # roofline
    rate_fit = total_iter / t_batched * 2 * n * P * P / 1e9
    mm_runs = [matmul_rate(B, n, P, args.device, dtype) for _ in range(args.repeat)]
    rate_mm = float(np.median(mm_runs))
    fractions = [total_iter / t * 2 * n * P * P / 1e9 / rate_mm for t in t_runs]
    print(f"roofline: effective {total_iter / t_batched:.1f} problem-iterations/s x 2nP^2 = {rate_fit:.2f} GFLOP/s; "
          f"same-shape batched J^T J matmul ({B}, {P}, {n}) @ ({B}, {n}, {P}), {args.dtype}, {args.device}: "
          f"{_spread(mm_runs, ' GFLOP/s')}; fraction {rate_fit / rate_mm:.0%}"
          + (f" (each run against the median matmul: {min(fractions):.0%}..{max(fractions):.0%})"
             if args.repeat > 1 else ""))
    summary.update(effective_gflops=rate_fit, matmul_gflops=rate_mm, roofline_fraction=rate_fit / rate_mm,
                   batched_s_runs=t_runs, matmul_gflops_runs=mm_runs)

    if args.device != "cpu":
        res_cpu, t_cpu, _ = timed_fit(model, X, y, init, "cpu", dtype, **fit_kw)
        rss_cpu = (res_cpu.risk * res_cpu.n).double().numpy()
        print(f"(a') batched LM on the CPU ({torch.get_num_threads()} threads), same run: {t_cpu:.2f} s, "
              f"iterations total {int(res_cpu.n_iter.sum())}; ratio CPU / {args.device}: {t_cpu / t_batched:.1f}x")
        print(f"    objective {args.device} vs cpu: max relative difference "
              f"{(np.abs(rss_batched - rss_cpu) / rss_cpu).max():.2e}")
        summary.update(batched_cpu_s=t_cpu, ratio_cpu_over_device=t_cpu / t_batched)

    # (b) strong anchor
    theta0 = model.flatten(init).numpy()
    Xn, yn = X.numpy(), y.numpy()
    residuals = [numpy_residual(model, Xn[b], yn[b]) for b in range(B)]
    check = residuals[0].head(200)
    J_ref = model.jacobian(model.unflatten(torch.as_tensor(theta0[0])), X[0, :200]).numpy()
    jac_err = np.abs(check.jacobian(theta0[0]) - J_ref).max() / np.abs(J_ref).max()
    if not jac_err < 1e-10:
        raise RuntimeError(f"the anchor's NumPy Jacobian disagrees with the model's: {jac_err:.2e}")
    tasks = [(residuals[b], theta0[b], lo, hi, args.tol) for b in range(B)]
    an, anchor_runs, anchor_cpu_runs, costs = run_anchor(tasks, args.threads, args.repeat)
    t_anchor = float(np.median(anchor_runs))
    rss_anchor = np.array([s[0] for s in an])
    cpu_anchor = float(np.median(anchor_cpu_runs))
    print(f"(b) strong anchor: scipy least_squares (trf, exact NumPy Jacobian, checked against the model's to "
          f"{jac_err:.1e}), pool of {args.threads} processes x 1 BLAS thread, every data set: "
          f"{_spread(anchor_runs, ' s')} "
          f"({cpu_anchor:.2f} CPU s) for {B} fits ({min(s[3] for s in an):.2f}..{max(s[3] for s in an):.2f} s "
          f"per fit); nfev median {int(np.median([s[1] for s in an]))}, status {sorted({s[2] for s in an})}")
    print(f"    one evaluation in a worker (CPU ms): residual {costs[0]:.2f}, Jacobian {costs[1]:.2f}, SVD of the "
          f"n x P Jacobian {costs[2]:.2f} (trf's exact trust-region step takes one per iteration)")

    def detail(b: int) -> str:
        return (f"batched converged={bool(res.converged[b])} bounds={','.join(res.boundary_params[b]) or '-'} "
                f"iters={int(res.n_iter[b])}; anchor status={an[b][2]} nfev={an[b][1]} "
                f"at bound={','.join(an[b][4]) or '-'}")

    _agreement("batched", rss_batched, "anchor", rss_anchor, detail)
    summary.update(anchor_s=t_anchor, anchor_s_runs=anchor_runs, ratio_anchor=t_anchor / t_batched,
                   batched_cpu_s=cpu_batched,
                   anchor_cpu_s=cpu_anchor, ratio_anchor_cpu=cpu_anchor / cpu_batched)

    # (c) finite-difference loop
    m = min(args.scipy_sets, B)
    t_fd = None
    if m > 0:
        if args.model == "softmax-linear":
            f = numpy_model(model, {k: v.numpy() for k, v in model.anchors.items()})
            funs = [lambda t, b=b: f(t, Xn[b]) - yn[b] for b in range(m)]
        else:  # the same NumPy function as the anchor's, without its Jacobian
            funs = [numpy_residual(model, Xn[b], yn[b]).residual for b in range(m)]
        fd, t_sub = run_fd_loop(funs, theta0[:m], lo, hi, args.tol)
        t_fd = t_sub * B / m
        rss_fd = np.array([s[0] for s in fd])
        print(f"(c) scipy least_squares loop (trf, 2-point Jacobian), 1 process: {t_sub:.2f} s for {m} data sets, "
              f"{t_sub / m:.2f} s per fit; nfev median {int(np.median([s[1] for s in fd]))}, "
              f"status {sorted({s[2] for s in fd})}")
        if m < B:
            print(f"    EXTRAPOLATED: the loop ran on the first {m} of the {B} data sets; its time for all {B} is "
                  f"taken as {t_sub:.2f} s x {B}/{m} = {t_fd:.1f} s (per-fit times ranged "
                  f"{min(s[3] for s in fd):.1f}..{max(s[3] for s in fd):.1f} s)")
        _agreement("fd-loop", rss_fd, "anchor", rss_anchor[:m],
                   lambda b: f"fd status={fd[b][2]} nfev={fd[b][1]}; anchor status={an[b][2]} nfev={an[b][1]}")
        summary.update(fd_s_extrapolated=t_fd, fd_sets=m, ratio_fd=t_fd / t_batched)

    if args.device == "cpu" and not args.no_profile:
        share, wall = outside_share(model, X.to(dtype), y.to(dtype), model.cast(init, dtype=dtype), max_iter=20)
        print(f"share of time outside torch operators (20 LM iterations, profiled): {share:.1%} of {wall:.2f} s")
    if args.profile_table:
        profile_table(model, X.to(args.device, dtype), y.to(args.device, dtype),
                      model.cast(init, device=args.device, dtype=dtype), args.profile_table)
    if args.memory:
        summary["memory"] = memory_report(args)
    if args.scaling:
        scaling_table(args, float(n_iter.median()))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    if t_fd is not None:
        print(f"speedup finite-difference scipy loop (EXTRAPOLATED from {m} fits) / batched: {t_fd / t_batched:.1f}x")
    if args.device == "cpu":
        print(f"CPU time (all threads and processes) strong anchor / batched: {cpu_anchor / cpu_batched:.1f}x")
    converged_anchor = sum(int(s[2]) > 0 for s in an)
    converged_batched = int(res.converged.sum())
    print(f"time to converged fits (wall s per converged fit; the same starts and tol {args.tol:g}): batched "
          f"{t_batched / max(converged_batched, 1):.3f} s ({converged_batched}/{B} converged, "
          f"{total_iter / t_batched:.1f} problem-iterations/s), anchor {t_anchor / max(converged_anchor, 1):.3f} s "
          f"({converged_anchor}/{B} converged: status > 0); ratio "
          + (f"{(t_anchor / converged_anchor) / (t_batched / converged_batched):.1f}x"
             if converged_anchor and converged_batched else "n/a (a method converged no fit)"))
    print(f"speedup strong anchor (scipy trf, exact Jacobian, {args.threads}-process pool) / batched: "
          f"{t_anchor / t_batched:.1f}x")


if __name__ == "__main__":
    main(ARGS)
