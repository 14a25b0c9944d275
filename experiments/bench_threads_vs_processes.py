"""Benchmark: what Python's GIL costs the batched LM's worker threads (issue 18).

The HMoE benchmark of ``bench_estimators.py`` (16 data sets, n = 1e4, near-truth starts) is cut into
two halves of 8 data sets (the even and the odd ones, and the first and the last eight), and each
half is fitted by ``fit_batch`` with one worker thread and one torch thread:

(a) each half alone (one process, nothing else running);
(b) both halves at once in two processes (the same code, started together after both are ready);
(c) both halves at once in two threads of one process;

and (d) all 16 by ``fit_batch`` with two worker threads (the library's default on two cores). (b)
against (a) is what the two cores cost each other (memory, caches); (c) against (b) is what the two
threads of one process cost each other: the GIL, which every torch operation releases and takes
back. The per-fit results of (a), (b) and (c) are identical (one problem's answer never depends on
its stack or thread; checked).

    python experiments/bench_threads_vs_processes.py --model hmoe-shared
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_estimators import bench_problems  # noqa: E402

from hmoe_sim.estimators import fit_batch  # noqa: E402

SPLITS = {"even/odd": lambda B: (list(range(0, B, 2)), list(range(1, B, 2))),
          "first/last": lambda B: (list(range(B // 2)), list(range(B // 2, B)))}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="hmoe-shared", choices=("softmax-linear", "hmoe-shared", "hmoe-nonshared"))
    ap.add_argument("--n-sets", type=int, default=16)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=2, metavar=("SPLIT", "HALF"), help=argparse.SUPPRESS)
    return ap


def problems(args: argparse.Namespace):
    """The benchmark's model, data and near-truth starts (``bench_estimators.bench_problems``)."""
    _, model, X, y, init = bench_problems(args.model, args.seed, args.n, args.n_sets)
    return model, X, y, init


def fit_rows(model, X, y, init, rows: list[int], args: argparse.Namespace):
    """``fit_batch`` with one worker thread on the data sets ``rows``: (seconds, RSS per fit, iterations
    per fit)."""
    index = torch.tensor(rows)
    t0 = time.perf_counter()
    res = fit_batch(model, X[index], y[index], {k: v[index] for k, v in init.items()}, max_iter=args.max_iter,
                    tol=args.tol, workers=1)
    seconds = time.perf_counter() - t0
    return seconds, (res.risk * res.n).double().tolist(), res.n_iter.tolist()


def warm_up(model, X, y, init) -> None:
    fit_batch(model, X[:1], y[:1], {k: v[:1] for k, v in init.items()}, max_iter=2, workers=1)


def child(args: argparse.Namespace) -> None:
    """One half in this process: ready, wait for the go, fit, report as JSON."""
    torch.set_num_threads(1)
    model, X, y, init = problems(args)
    rows = SPLITS[args.child[0]](args.n_sets)[int(args.child[1])]
    warm_up(model, X, y, init)
    print("ready", flush=True)
    sys.stdin.readline()
    seconds, rss, iters = fit_rows(model, X, y, init, rows, args)
    print(json.dumps({"seconds": seconds, "rss": rss, "iters": iters}), flush=True)


def in_processes(split: str, args: argparse.Namespace) -> list[dict]:
    """Both halves at once, one process each (started together once both are set up)."""
    command = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--n-sets", str(args.n_sets),
               "--n", str(args.n), "--tol", str(args.tol), "--max-iter", str(args.max_iter), "--seed", str(args.seed)]
    children = [subprocess.Popen([*command, "--child", split, str(half)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True) for half in (0, 1)]
    for c in children:
        line = c.stdout.readline()  # type: ignore[union-attr]
        if line.strip() != "ready":
            raise RuntimeError(f"a child process failed before fitting: {line!r}")
    for c in children:
        c.stdin.write("go\n")  # type: ignore[union-attr]
        c.stdin.flush()  # type: ignore[union-attr]
    out = [json.loads(c.stdout.readline()) for c in children]  # type: ignore[union-attr]
    for c in children:
        c.wait()
    return out


def in_threads(model, X, y, init, halves, args: argparse.Namespace) -> tuple[float, list]:
    """Both halves at once, one thread each: (wall seconds of the two, each thread's result)."""
    out: list = [None, None]
    barrier = threading.Barrier(3)

    def work(i: int) -> None:
        barrier.wait()
        out[i] = fit_rows(model, X, y, init, halves[i], args)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, out


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    model, X, y, init = problems(args)
    warm_up(model, X, y, init)
    print(f"setup: {args.model}, {args.n_sets} data sets of n = {args.n}, near-truth starts, tol {args.tol}; "
          f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    summary = {}
    for split, cut in SPLITS.items():
        halves = cut(args.n_sets)
        alone = [fit_rows(model, X, y, init, h, args) for h in halves]
        procs = in_processes(split, args)
        wall_threads, threads = in_threads(model, X, y, init, halves, args)
        same = all(a[1] == p["rss"] == t[1] and a[2] == p["iters"] == t[2]
                   for a, p, t in zip(alone, procs, threads, strict=True))
        print(f"halves {split}: iterations {alone[0][2]} | {alone[1][2]}")
        print(f"  (a) each alone:            {alone[0][0]:.2f} s and {alone[1][0]:.2f} s")
        print(f"  (b) at once, two processes: {procs[0]['seconds']:.2f} s and {procs[1]['seconds']:.2f} s "
              f"(wall {max(p['seconds'] for p in procs):.2f} s)")
        print(f"  (c) at once, two threads:   {threads[0][0]:.2f} s and {threads[1][0]:.2f} s "
              f"(wall {wall_threads:.2f} s)")
        print(f"  fits identical in (a), (b), (c): {same}")
        summary[split] = (max(p["seconds"] for p in procs), wall_threads)
    t0 = time.perf_counter()
    fit_batch(model, X, y, init, max_iter=args.max_iter, tol=args.tol, workers=2)
    both = time.perf_counter() - t0
    print(f"(d) all {args.n_sets} by fit_batch with two worker threads (shared queue, balanced): {both:.2f} s")
    for split, (procs, threads) in summary.items():
        print(f"two threads of one process / two processes, halves {split}: {threads / procs:.2f}x the wall time")


if __name__ == "__main__":
    ARGS = _parser().parse_args()
    child(ARGS) if ARGS.child else main(ARGS)
