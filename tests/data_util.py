"""Shared test helpers: small synthetic data sets written in the real on-disk formats
(IDX files, image folders), and what the tests that run ``acmix`` in a child process use."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
from PIL import Image

from acmix.data import FASHION_MNIST_FILES, write_idx

#: Overrides of a tiny, quiet training run on the fmnist_tiny recipe (the CLI tests).
TINY_RUN = [
    "model.kwargs={stem_stride: 2, widths: [8, 16, 16, 32], depths: [1, 1, 1, 1]}",
    "data.batch_size=16",
    "aug.crop=none",
    "train.threads=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
]


def class_images(labels: np.ndarray, size: int = 28, seed: int = 0) -> np.ndarray:
    """``(N, size, size)`` uint8 images whose class is easy to learn.

    Class ``c`` is a bright horizontal bar at row ``2 + 2 c`` (scaled to
    ``size``) on a noisy dark background, so a small network separates the
    classes after a few steps.
    """
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 60, size=(len(labels), size, size), dtype=np.uint8)
    for i, c in enumerate(labels):
        row = (2 + 2 * int(c)) * size // 28
        imgs[i, row : row + max(1, 2 * size // 28), 2 : size - 2] = 220
    return imgs


def make_fake_fmnist(root: Path, n_train: int = 64, n_test: int = 40, seed: int = 0) -> Path:
    """Write a Fashion-MNIST-shaped IDX data set (gzipped, the Debian package's names)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        img_name, lbl_name = FASHION_MNIST_FILES[split]
        write_idx(root / img_name, class_images(labels, 28, seed + n))
        write_idx(root / lbl_name, labels)
    return root


def make_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog"),
    per_class: int = 3,
    size: int = 20,
    splits: tuple[str, ...] = ("train", "val"),
) -> Path:
    """Write ``root/<split>/<class>/<i>.png`` RGB images (class = bar position)."""
    for split in splits:
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            imgs = class_images(np.full(per_class, c), size, seed=c)
            for i, img in enumerate(imgs):
                Image.fromarray(np.stack([img] * 3, axis=-1)).save(d / f"{i}.png")
    return root


def child_env() -> dict[str, str]:
    """The environment of an ``acmix`` child process: unbuffered output, one thread."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def wait_for(proc: subprocess.Popen, needle: str, timeout: float = 120.0) -> str:
    """Read ``proc``'s stdout up to the first line holding ``needle``; the lines read.

    Kills ``proc`` and fails (showing the output) if the line does not come in time.
    """
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen += line
        if needle in line:
            return seen
    proc.kill()
    raise AssertionError(f"never saw {needle!r}; output:\n{seen}")
