"""Whole-model benchmark: train step and inference of our models vs their plain counterparts.

acmix_resnet50 vs torchvision resnet50 and ACmix Swin-T vs timm Swin-T, batch 8
at 224x224 by default, measured side by side in one run, as ratios. Usage::

    python benchmarks/bench_models.py [--device cuda] [--batch 8] [--only resnet] [--out PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from acmix.benchmark import bench_models, environment_line, format_model_table, tune_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default=None, help="substring of the model name")
    parser.add_argument("--min-time", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=None, help="write OUT.md")
    parser.add_argument(
        "--malloc", choices=("tuned", "default"), default="tuned", help="as in `acmix bench`"
    )
    args = parser.parse_args()
    if args.malloc == "tuned":
        tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment_line()
    print(env)
    pairs = bench_models(
        batch=args.batch,
        img_size=args.img_size,
        device=args.device,
        min_time=args.min_time,
        only=args.only,
    )
    table = format_model_table(pairs)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(f"{env}\n\n{table}\n")


if __name__ == "__main__":
    main()
