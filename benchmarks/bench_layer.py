"""Benchmark one ACmix layer against nn.Conv2d and the reference path, side by side.

The same measurement as ``acmix bench`` (this script is that command, with its
flags): for batch 8 at (C, H) = (64, 56), (128, 28), (256, 14), (512, 7) and the
stride-2 case (128, 56 -> 28), forward and forward+backward time and peak extra
memory of nn.Conv2d(C, C, 3, padding=1), our ACmix and our reference path (the
authors' unfold algorithm), as ratios to Conv2d. Usage::

    python benchmarks/bench_layer.py [--device cuda] [--no-reference] [--out results/]

``--out DIR`` writes ``DIR/<machine>_layer.{md,json}``; ``--help`` lists every flag.
"""

from __future__ import annotations

import sys

from acmix.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
