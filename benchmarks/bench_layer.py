"""Benchmark one ACmix layer against nn.Conv2d and the reference path, side by side.

Prints, for batch 8 at (C, H) = (64, 56), (128, 28), (256, 14), (512, 7) and the
stride-2 case (128, 56 -> 28): forward and forward+backward time and peak extra
memory of nn.Conv2d(C, C, 3, padding=1), our ACmix and our reference path (the
authors' unfold algorithm), as ratios to Conv2d. Usage::

    python benchmarks/bench_layer.py [--device cuda] [--no-reference] [--out results/x]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from acmix.benchmark import (
    LAYER_SHAPES,
    bench_layers,
    environment_line,
    format_layer_table,
    results_json,
    tune_allocator,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow reference")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md and OUT.json")
    parser.add_argument(
        "--malloc", choices=("tuned", "default"), default="tuned", help="as in `acmix bench`"
    )
    args = parser.parse_args()
    if args.malloc == "tuned":
        tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = environment_line()
    print(header)
    results = bench_layers(
        LAYER_SHAPES,
        batch=args.batch,
        device=args.device,
        include_reference=not args.no_reference,
        min_time=args.min_time,
    )
    table = format_layer_table(results)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(f"{header}\n\n{table}\n")
        args.out.with_suffix(".json").write_text(results_json(results))


if __name__ == "__main__":
    main()
