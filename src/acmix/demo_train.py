"""``python -m acmix.demo_train``: the paper's claim, replayed small on real data on a CPU.

Trains three networks that differ only in their token mixer -- ACmix, a plain
3x3 convolution, and ACmix's attention path alone -- on Fashion-MNIST (a
fixed 30,000-image subset of the training set, one epoch; the
``configs/fmnist_tiny_quick.yaml`` recipe), evaluates each on the full
10,000-image test set, and prints a table of test accuracy, parameters,
multiply-adds and training throughput, plus the paths of the plots (loss
curves and test accuracy of the three; α and β of every ACmix layer).

About 6 minutes on 2 CPU cores. Fashion-MNIST comes from the Debian
package ``dataset-fashion-mnist`` (``make demo`` installs it); without it the
demo says how to install it and offers ``--dataset digits``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch

from acmix.analysis import count_macs, count_params
from acmix.data import DatasetNotFoundError, load_digits, load_fashion_mnist
from acmix.engine import Config, train
from acmix.engine.config import (
    AugConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SchedConfig,
    TrainConfig,
)
from acmix.engine.metrics import plot_alpha_beta, plot_curves
from acmix.layers import ACmix

__all__ = ["MIXER_LABELS", "demo_config", "main"]

#: The three networks: mixer -> description.
MIXER_LABELS = {
    "acmix": "ACmix (attention + convolution)",
    "conv": "convolution only (3x3)",
    "attn": "attention only (7x7 window)",
}


def demo_config(
    mixer: str,
    output: str | os.PathLike,
    *,
    dataset: str = "fashion-mnist",
    data_dir: str | None = None,
    train_images: int | None = 30000,
    epochs: int = 1,
    threads: int | None = None,
) -> Config:
    """The demo's recipe (``configs/fmnist_tiny_quick.yaml``) for one mixer.

    Short-budget choices: no augmentation, batch 64, SGD with Nesterov
    momentum, lr 0.05 with a short warm-up and a cosine decay over the run.
    """
    digits = dataset == "digits"
    return Config(
        model=ModelConfig(
            name="acmix_tiny",
            kwargs={"stem_stride": 1 if digits else 2, "mixer": mixer},
        ),
        data=DataConfig(
            dataset=dataset,
            data_dir=data_dir,
            train_subset=train_images,
            batch_size=64,
            eval_batch_size=500,
        ),
        aug=AugConfig(crop="none", hflip=0.0),
        optim=OptimConfig(
            name="sgd",
            lr=0.05,
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
            decay_1d=False,
        ),
        sched=SchedConfig(name="cosine", warmup_epochs=0.1, warmup_lr=0.005),
        train=TrainConfig(
            epochs=epochs * (15 if digits else 1),
            threads=threads,
            output=str(output),
            log_every=10,
            tensorboard=False,
            plots=True,
        ),
    )


def _warm_up() -> None:
    """Run one small ACmix layer forward and backward before timing anything.

    The first call may build the fused CPU attention kernel (cached afterwards);
    doing it here keeps that one-off cost out of the networks' images/s.
    """
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    ACmix(8, 8, head=2)(x).sum().backward()


def _check_data(dataset: str, data_dir: str | None) -> None:
    if dataset == "fashion-mnist":
        load_fashion_mnist(data_dir, "test")
    else:
        load_digits("test")


def _demo_log(msg: str) -> None:
    """The trainer's log lines, without the ``--resume`` hint this command has no flag for."""
    print(msg.split("; resume with --resume")[0] if msg.startswith("stopped (") else msg)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="python -m acmix.demo_train",
        description="Train ACmix, conv-only and attention-only versions of one small network "
        "on Fashion-MNIST and compare them on the full test set.",
    )
    p.add_argument("--output", "-o", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument(
        "--train-images",
        type=int,
        default=30000,
        help="training images (a fixed subset; default 30000 of 60000)",
    )
    p.add_argument("--epochs", type=int, default=1, help="epochs over them (default 1)")
    p.add_argument(
        "--dataset",
        choices=("fashion-mnist", "digits"),
        default="fashion-mnist",
        help="digits: scikit-learn's bundled 8x8 digits, when Fashion-MNIST is not installed",
    )
    p.add_argument("--data-dir", help="Fashion-MNIST IDX directory (default: the Debian package's)")
    p.add_argument(
        "--mixers",
        nargs="+",
        choices=tuple(MIXER_LABELS),
        default=list(MIXER_LABELS),
        help="networks to train (default: all three)",
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    try:
        _check_data(args.dataset, args.data_dir)
    except DatasetNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    out = Path(args.output)
    t_start = time.perf_counter()
    if any(m != "conv" for m in args.mixers):
        print("preparing the attention kernel (built on first use, then cached) ...", flush=True)
        _warm_up()
    rows = []
    runs = {}
    for mixer in args.mixers:
        cfg = demo_config(
            mixer,
            out / mixer,
            dataset=args.dataset,
            data_dir=args.data_dir,
            train_images=args.train_images,
            epochs=args.epochs,
            threads=threads,
        )
        if args.quiet:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=False))
        print(f"\n== {mixer}: {MIXER_LABELS[mixer]} ==", flush=True)
        t0 = time.perf_counter()
        res = train(cfg, log=_demo_log)
        wall = time.perf_counter() - t0
        if res.stopped in ("SIGINT", "SIGTERM"):
            print(
                f"demo stopped ({res.stopped}) during the {mixer} run, its checkpoint saved in "
                f"{out / mixer / 'checkpoints'}; the demo has no --resume: run it again to "
                "start over",
                file=sys.stderr,
            )
            return 128 + int(getattr(signal, res.stopped))
        model = res.model.eval()
        side = cfg.data.img_size or (8 if args.dataset == "digits" else 28)
        macs = count_macs(model, (1, 1, side, side)).total
        rows.append(
            dict(
                mixer=mixer,
                top1=res.val["top1"],
                count=res.val["count"],
                params=count_params(model),
                macs=macs,
                ips=res.images_per_s,
                wall=wall,
            )
        )
        runs[mixer] = out / mixer

    total = time.perf_counter() - t_start
    n_test = rows[0]["count"]
    print(
        f"\nacmix_tiny on {args.dataset}: {args.train_images} training images x {args.epochs} "
        f"epoch(s), test on all {n_test} test images, {threads} CPU thread(s)\n"
    )
    print("| network | test top-1 | params | MACs / image | train images/s | time |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {MIXER_LABELS[r['mixer']]} | {r['top1']:.2f}% | {r['params'] / 1e3:.1f}K | "
            f"{r['macs'] / 1e6:.2f}M | {r['ips']:.0f} | {r['wall']:.0f}s |"
        )
    print(f"\ntotal time: {total / 60:.1f} min")
    plots = [plot_curves(runs, out / "comparison.png")]
    if "acmix" in runs:
        plots.append(plot_alpha_beta(runs["acmix"] / "alpha_beta.csv", out / "alpha_beta.png"))
    for plot in plots:
        if plot is not None:
            print(f"plot: {plot.resolve()}")
    print(f"runs (checkpoints, metrics.csv, steps.csv): {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
