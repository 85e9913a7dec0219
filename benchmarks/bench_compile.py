"""torch.compile on whole acmix models: compile time and speed-up over eager, side by side.

The C++ kernels are registered ops, so each model compiles as one graph
(``fullgraph=True``) with the kernels inside. Usage::

    python benchmarks/bench_compile.py [--model acmix_resnet26] [--batch 8] [--img-size 224]
        [--backend inductor] [--train]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch

import acmix  # noqa: F401  (registers the acmix_* models)
from acmix.analysis.timing import time_fn
from acmix.benchmark import environment_line, tune_allocator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="acmix_resnet26", help="a registered acmix_* model")
    parser.add_argument("--batch", type=int, default=8, help="images per call")
    parser.add_argument("--img-size", type=int, default=224, help="input height and width")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--train", action="store_true", help="time fwd + bwd instead of inference")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per measurement")
    args = parser.parse_args()
    tune_allocator()
    print(environment_line())
    model = timm.create_model(args.model)
    model.train(args.train)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    compiled = torch.compile(model, fullgraph=True, backend=args.backend)

    def run(fn):
        def step() -> None:
            if args.train:
                fn(x).sum().backward()
            else:
                with torch.no_grad():
                    fn(x)

        return step

    start = time.perf_counter()
    run(compiled)()
    compile_s = time.perf_counter() - start
    eager_s = time_fn(run(model), x.device, min_time=args.min_time)
    compiled_s = time_fn(run(compiled), x.device, min_time=args.min_time)
    what = "train step" if args.train else "inference"
    print(
        f"{args.model} {what} batch {args.batch} {args.img_size}px, backend {args.backend}: "
        f"compile (first call) {compile_s:.1f} s; eager {1e3 * eager_s:.1f} ms, "
        f"compiled {1e3 * compiled_s:.1f} ms, speed-up {eager_s / compiled_s:.2f}x"
    )


if __name__ == "__main__":
    main()
