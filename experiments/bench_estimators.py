"""Benchmark: batched LM (hmoe-sim) against a loop of scipy.optimize.least_squares.

Setup (issue 4): flat softmax MoE with linear experts and one known anchor expert
(preset ``softmax-linear``), D = 8, k* = 2 true atoms, k = 3 fitted, near-truth starts;
the same data sets, starts, box and tolerance for both. Last line printed: the speedup.

    python experiments/bench_estimators.py                       # 64 data sets, n = 10^4
    python experiments/bench_estimators.py --n-sets 8 --n 2000   # reduced
    python experiments/bench_estimators.py --scaling             # also fits/s vs n and batch
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
from scipy.optimize import least_squares

from hmoe_sim import make_preset, sample_batch
from hmoe_sim.estimators import Bounds, fit_batch, init_near_truth


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
    out, t0 = [], time.perf_counter()
    for b in range(X.shape[0]):
        res = least_squares(lambda t, b=b: f(t, X[b]) - y[b], theta0[b], bounds=(lo, hi),
                            ftol=tol, xtol=tol, gtol=tol, method="trf")
        out.append((2 * res.cost, res.nfev, res.status))
    return out, time.perf_counter() - t0


def fits_per_second(model, setup, n, batch, device, max_iter):
    X, y = sample_batch(setup.true_model, setup.truth, n, setup.noise_std, list(range(batch)), device=device)
    init = init_near_truth(model, setup.true_model, setup.truth, batch_shape=batch, seed=1, device=device)
    t0 = time.perf_counter()
    fit_batch(model, X, y, init, max_iter=max_iter)
    if device != "cpu":
        torch.cuda.synchronize()
    return batch / (time.perf_counter() - t0)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-sets", type=int, default=64)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scaling", action="store_true", help="also fits/s against n and batch size")
    args = ap.parse_args()

    setup = make_preset("softmax-linear", seed=args.seed)
    model = setup.fit_model
    X, y = sample_batch(setup.true_model, setup.truth, args.n, setup.noise_std,
                        [np.random.SeedSequence([args.seed, b]) for b in range(args.n_sets)])
    init = init_near_truth(model, setup.true_model, setup.truth, batch_shape=args.n_sets, perturbation=0.1,
                           seed=args.seed)
    box = Bounds()
    lo, hi = (v.numpy() for v in box.vectors(model))
    print(f"setup: softmax-linear D={model.input_dim} k*={setup.true_model.n_atoms} k={model.n_atoms} "
          f"P={model.n_params} n={args.n} data sets={args.n_sets} tol={args.tol} device={args.device} "
          f"torch threads={torch.get_num_threads()}")

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
    print(f"(a) batched LM: {t_batched:.2f} s, converged {int(res.converged.sum())}/{args.n_sets}, "
          f"on boundary {int(res.on_boundary.sum())}, iterations median {int(res.n_iter.median())} "
          f"max {int(res.n_iter.max())}")

    f = numpy_model(model, {k: v.numpy() for k, v in model.anchors.items()})
    theta0 = model.flatten(init).numpy()
    sp, t_scipy = run_scipy(f, X.numpy(), y.numpy(), theta0, lo, hi, args.tol)
    rss_scipy = np.array([s[0] for s in sp])
    print(f"(b) scipy least_squares loop (trf, 2-point Jacobian): {t_scipy:.2f} s, "
          f"nfev median {int(np.median([s[1] for s in sp]))}, status {sorted({s[2] for s in sp})}")

    rel = np.abs(rss_batched - rss_scipy) / rss_scipy
    differ = np.nonzero(rel > 1e-6)[0]
    print(f"objective agreement: max relative difference {rel.max():.2e}; fits differing by > 1e-6: "
          f"{len(differ)}")
    for b in differ:
        better = "batched" if rss_batched[b] < rss_scipy[b] else "scipy"
        print(f"  fit {b}: RSS batched {rss_batched[b]:.10g} scipy {rss_scipy[b]:.10g} (lower: {better}); "
              f"batched converged={bool(res.converged[b])} on_boundary={bool(res.on_boundary[b])} "
              f"iters={int(res.n_iter[b])}; scipy status={sp[b][2]} nfev={sp[b][1]}")

    if dev == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak memory (process max RSS): {peak:.0f} MiB")
    else:
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    share, wall = outside_share(model, Xd, yd, initd, max_iter=20)
    print(f"share of time outside torch operators (20 LM iterations, profiled): {share:.1%} of {wall:.2f} s")

    if args.scaling:
        for n in (1_000, 10_000, 100_000):
            print(f"fits/s at batch 16, n={n}: {fits_per_second(model, setup, n, 16, dev, 20):.2f} (20 iterations)")
        for batch in (1, 16, 64, 256):
            print(f"fits/s at n=1000, batch {batch}: {fits_per_second(model, setup, 1000, batch, dev, 20):.2f} "
                  f"(20 iterations)")
    print(f"speedup scipy loop / batched: {t_scipy / t_batched:.1f}x")


if __name__ == "__main__":
    main()
