"""Benchmark: batched LM (hmoe-sim) against a loop of scipy.optimize.least_squares.

Setup (issue 4): flat softmax MoE with linear experts and one known anchor expert
(preset ``softmax-linear``), D = 8, k* = 2 true atoms, k = 3 fitted, near-truth starts;
the same data sets, starts, box and tolerance for both. Last line printed: the speedup.

    python experiments/bench_estimators.py                       # 64 data sets, n = 10^4
    python experiments/bench_estimators.py --scipy-sets 16       # scipy on 16 of them, extrapolated
    python experiments/bench_estimators.py --n-sets 8 --n 2000   # reduced
    python experiments/bench_estimators.py --scaling             # also fits/s vs n and batch

``--threads`` sets the threads of both methods (torch intra-op threads; OpenBLAS/OpenMP/MKL
threads of NumPy and SciPy, through the environment before NumPy loads).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-sets", type=int, default=64)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for both methods (default: all cores)")
    ap.add_argument("--scipy-sets", type=int, default=None,
                    help="run the scipy loop on the first m data sets only and extrapolate its time")
    ap.add_argument("--scaling", action="store_true", help="also fits/s against n and batch size")
    ap.add_argument("--scaling-only", type=float, metavar="ITERS_PER_FIT", default=None,
                    help="only the scaling table, fits/s computed with this many LM iterations per fit")
    ap.add_argument("--scaling-point", nargs=2, type=int, metavar=("N", "BATCH"), help=argparse.SUPPRESS)
    return ap


ARGS = _parser().parse_args()
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(ARGS.threads)

import resource  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.optimize import least_squares  # noqa: E402

from hmoe_sim import make_preset, sample_batch  # noqa: E402
from hmoe_sim.estimators import Bounds, fit_batch, init_near_truth  # noqa: E402

SCALING_ITERS = 20


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


def run_scipy(f, X, y, theta0, lo, hi, tol):
    """One ``least_squares`` per data set: (RSS, nfev, status, seconds, parameters at a bound)."""
    out, t0 = [], time.perf_counter()
    for b in range(X.shape[0]):
        t1 = time.perf_counter()
        res = least_squares(lambda t, b=b: f(t, X[b]) - y[b], theta0[b], bounds=(lo, hi),
                            ftol=tol, xtol=tol, gtol=tol, method="trf")
        at = [f"theta[{j}]" for j in np.nonzero((res.x <= lo + 1e-6 * (1 + abs(lo)))
                                                 | (res.x >= hi - 1e-6 * (1 + abs(hi))))[0]]
        out.append((2 * res.cost, res.nfev, res.status, time.perf_counter() - t1, at))
    return out, time.perf_counter() - t0


def scaling_point(n: int, batch: int, device: str, threads: int) -> tuple[float, float]:
    """LM iterations per second (summed over the batch) and this process's peak memory (MiB).

    ``SCALING_ITERS`` LM iterations with every fit kept active (``tol`` far below reach), so
    the figure is the cost of one iteration; fits/s = this / iterations per fit.
    """
    setup = make_preset("softmax-linear")
    model = setup.fit_model
    X, y = sample_batch(setup.true_model, setup.truth, n, setup.noise_std, list(range(batch)), device=device)
    init = init_near_truth(model, setup.true_model, setup.truth, batch_shape=batch, seed=1, device=device)
    fit_batch(model, X[:1], y[:1], {k: v[:1] for k, v in init.items()}, max_iter=2)  # warm-up
    if device != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = fit_batch(model, X, y, init, max_iter=SCALING_ITERS, tol=1e-300)
    if device != "cpu":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = _peak_rss_mib() if device == "cpu" else torch.cuda.max_memory_allocated() / 2**20
    return float(res.n_iter.sum()) / wall, peak


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


def scaling_table(args: argparse.Namespace, median_iters: float) -> None:
    """Each point in a fresh process, so that its peak memory is its own."""
    print(f"scaling ({SCALING_ITERS} LM iterations per point, each point a fresh process; fits/s assumes "
          f"{median_iters:.0f} iterations per fit, the median of the main run; load average "
          f"{os.getloadavg()[0]:.2f}):")
    print(f"  {'n':>7} {'batch':>5} {'iterations/s':>13} {'fits/s':>8} {'peak MiB':>9}")
    points = [(n, 16) for n in (1_000, 10_000, 100_000)] + [(1_000, b) for b in (1, 16, 64, 256)]
    for n, batch in dict.fromkeys(points):
        cmd = [sys.executable, __file__, "--scaling-point", str(n), str(batch), "--device", args.device,
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
        rate, peak = float(out[-2]), float(out[-1])
        print(f"  {n:>7} {batch:>5} {rate:>13.1f} {rate / median_iters:>8.2f} {peak:>9.0f}")


def outside_share(model, X, y, init, max_iter):
    """Share of wall time not spent inside torch operators (profiler self-times of aten ops)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if X.is_cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fit_batch(model, X, y, init, max_iter=max_iter)
    wall = time.perf_counter() - t0
    inside = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")) / 1e6
    return max(0.0, 1 - inside / wall), wall


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.scaling_point:
        rate, peak = scaling_point(*args.scaling_point, args.device, args.threads)
        print(rate, peak)
        return
    if args.scaling_only is not None:
        scaling_table(args, args.scaling_only)
        return
    setup = make_preset("softmax-linear", seed=args.seed)
    model = setup.fit_model
    X, y = sample_batch(setup.true_model, setup.truth, args.n, setup.noise_std,
                        [np.random.SeedSequence([args.seed, b]) for b in range(args.n_sets)])
    init = init_near_truth(model, setup.true_model, setup.truth, batch_shape=args.n_sets, perturbation=0.1,
                           seed=args.seed)
    box = Bounds()
    lo, hi = (v.numpy() for v in box.vectors(model))
    print(f"setup: softmax-linear D={model.input_dim} k*={setup.true_model.n_atoms} k={model.n_atoms} "
          f"P={model.n_params} n={args.n} data sets={args.n_sets} tol={args.tol} device={args.device}")
    print(f"threads: torch {torch.get_num_threads()}, NumPy/SciPy BLAS (OPENBLAS_NUM_THREADS) "
          f"{os.environ['OPENBLAS_NUM_THREADS']}; cores {os.cpu_count()}; load average before the run "
          f"{os.getloadavg()[0]:.2f}")

    dev = args.device
    Xd, yd = X.to(dev), y.to(dev)
    initd = model.cast(init, device=dev)
    fit_batch(model, Xd[:1], yd[:1], {k: v[:1] for k, v in initd.items()}, max_iter=2)  # warm-up
    if dev != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = fit_batch(model, Xd, yd, initd, max_iter=args.max_iter, tol=args.tol)
    if dev != "cpu":
        torch.cuda.synchronize()
    t_batched = time.perf_counter() - t0
    rss_batched = (res.risk * res.n).cpu().numpy()
    n_iter = res.n_iter.cpu()
    print(f"(a) batched LM: {t_batched:.2f} s, converged {int(res.converged.sum())}/{args.n_sets}, "
          f"on boundary {int(res.on_boundary.sum())}, iterations median {int(n_iter.median())} "
          f"max {int(n_iter.max())} total {int(n_iter.sum())}")
    kinds: dict[str, int] = {}
    for labels in res.boundary_params:
        for label in labels:
            kinds[label] = kinds.get(label, 0) + 1
    print(f"    bounds hit (fits per label): {kinds or 'none'}")
    if dev == "cpu":
        print(f"    peak memory (process peak RSS after (a)): {_peak_rss_mib():.0f} MiB")
    else:
        print(f"    peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")

    m = args.n_sets if args.scipy_sets is None else min(args.scipy_sets, args.n_sets)
    f = numpy_model(model, {k: v.numpy() for k, v in model.anchors.items()})
    theta0 = model.flatten(init).numpy()
    sp, t_sub = run_scipy(f, X[:m].numpy(), y[:m].numpy(), theta0[:m], lo, hi, args.tol)
    t_scipy = t_sub * args.n_sets / m
    rss_scipy = np.array([s[0] for s in sp])
    print(f"(b) scipy least_squares loop (trf, 2-point Jacobian): {t_sub:.2f} s for {m} data sets, "
          f"{t_sub / m:.2f} s per fit; nfev median {int(np.median([s[1] for s in sp]))}, "
          f"status {sorted({s[2] for s in sp})}")
    if m < args.n_sets:
        print(f"    EXTRAPOLATED: the scipy loop ran on the first {m} of the {args.n_sets} data sets; its time "
              f"for all {args.n_sets} is taken as {t_sub:.2f} s x {args.n_sets}/{m} = {t_scipy:.1f} s "
              f"(the fits are independent and alike; per-fit times ranged "
              f"{min(s[3] for s in sp):.1f}..{max(s[3] for s in sp):.1f} s)")
        batched_sub = float(res.n_iter[:m].sum()) / float(res.n_iter.sum()) * t_batched
        print(f"    cross-check: the batched time apportioned to the same {m} fits by their share of "
              f"LM iterations is {batched_sub:.2f} s, ratio {t_sub / batched_sub:.1f}x")

    rel = np.abs(rss_batched[:m] - rss_scipy) / rss_scipy
    differ = np.nonzero(rel > 1e-6)[0]
    print(f"objective agreement on {m} fits: max relative difference {rel.max():.2e}; fits differing by > 1e-6: "
          f"{len(differ)} (lower objective: batched {int((rss_batched[differ] < rss_scipy[differ]).sum())}, "
          f"scipy {int((rss_batched[differ] > rss_scipy[differ]).sum())})")
    for b in differ:
        better = "batched" if rss_batched[b] < rss_scipy[b] else "scipy"
        print(f"  fit {b}: RSS batched {rss_batched[b]:.10g} scipy {rss_scipy[b]:.10g} (lower: {better}); "
              f"batched converged={bool(res.converged[b])} bounds={','.join(res.boundary_params[b]) or '-'} "
              f"iters={int(res.n_iter[b])}; scipy status={sp[b][2]} nfev={sp[b][1]} "
              f"at bound={','.join(sp[b][4]) or '-'}")

    share, wall = outside_share(model, Xd, yd, initd, max_iter=20)
    print(f"share of time outside torch operators (20 LM iterations, profiled): {share:.1%} of {wall:.2f} s")
    if args.scaling:
        scaling_table(args, float(n_iter.median()))
    print(f"speedup scipy loop / batched: {t_scipy / t_batched:.1f}x")


if __name__ == "__main__":
    main(ARGS)
