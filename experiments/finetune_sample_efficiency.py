"""Fine-tuning sample efficiency of LoRA, MH-LoRA and HoRA adapters (issue 6).

Fits every student adapter on nested training sets drawn from two teachers (shared
cross-head update / independent per-head updates), writes one CSV row per fit and the
figure of test error against n. The default size runs on a CPU in a few minutes; ``--large``
is meant for ``--device cuda``.

Usage::

    python experiments/finetune_sample_efficiency.py                  # CPU default
    python experiments/finetune_sample_efficiency.py --device cuda --large
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hmoe_sim.devices import resolve_device, resolve_dtype
from hmoe_sim.finetune.sample_efficiency import FinetuneConfig, config_summary, run_sample_efficiency
from hmoe_sim.plotting import plot_finetune_sample_efficiency

ROOT = Path(__file__).resolve().parent.parent
LARGE = {"embed_dim": 64, "n_heads": 8, "n_tokens": 8, "n_grid": (100, 200, 400, 800, 1600, 3200, 6400, 12800),
         "n_seeds": 5}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda; cuda fails clearly without a GPU")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--large", action="store_true", help="E=64, H=8, N=8, n up to 12800, 5 seeds")
    parser.add_argument("--n-grid", type=int, nargs="+", help="training-set sizes")
    parser.add_argument("--seeds", type=int, help="replicates per teacher")
    parser.add_argument("--max-iter", type=int, help="L-BFGS iterations per fit")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "experiments/results/finetune/finetune_sample_efficiency.csv")
    parser.add_argument("--figure", type=Path, default=ROOT / "figures/finetune_sample_efficiency.png")
    args = parser.parse_args(argv)

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    dtype = resolve_dtype(args.dtype)
    torch.set_num_threads(args.threads)
    options: dict[str, object] = dict(LARGE) if args.large else {}
    if args.n_grid:
        options["n_grid"] = tuple(args.n_grid)
    if args.seeds:
        options["n_seeds"] = args.seeds
    if args.max_iter:
        options["max_iter"] = args.max_iter
    config = FinetuneConfig(**options)  # type: ignore[arg-type]
    print(json.dumps({**config_summary(config), "device": str(device), "dtype": args.dtype}))

    start = time.perf_counter()
    table = run_sample_efficiency(config, dtype=dtype, device=device, progress=print)
    elapsed = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    plot_finetune_sample_efficiency(table).savefig(args.figure, dpi=130)

    summary = table.groupby(["teacher", "label", "n_params", "n"])["test_mse"].mean().unstack("n")
    print(summary.to_string(float_format=lambda v: f"{v:.2e}"))
    print(f"converged fits: {int(table['converged'].sum())}/{len(table)}; wall time {elapsed:.1f} s "
          f"on {device} with {args.threads} thread(s)")
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
