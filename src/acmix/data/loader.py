"""Deterministic, resumable, shardable batches.

Every epoch's order is a permutation drawn from ``(seed, epoch)`` alone; step
``i`` of an epoch takes the ``i``-th slice of ``batch_size`` indices (the
*global* batch) and process ``r`` of ``W`` takes the ``r``-th contiguous
``batch_size / W`` of it. So a run on ``W`` processes sees, step for step,
the same global batches as a one-process run, and a resumed run continues at
any step. Each sample's random augmentation is seeded by ``(seed, epoch,
index)``, so it does not depend on the number of processes or workers either.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from acmix.data.datasets import (
    DataError,
    ImageFolder,
    load_digits,
    load_fashion_mnist,
)
from acmix.data.transforms import build_eval_transform, build_train_transform

if TYPE_CHECKING:
    from acmix.data.config import AugConfig, DataConfig

__all__ = [
    "DataBundle",
    "EvalBatchSampler",
    "SeededDataset",
    "TrainBatchSampler",
    "auto_workers",
    "build_data",
    "sample_seed",
]

_MASK64 = (1 << 64) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed from ``(seed, epoch, index)`` (splitmix64 steps)."""
    z = 0
    for v in (seed, epoch, index):
        z = (z + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        z ^= z >> 31
    return z >> 1


class SeededDataset(Dataset):
    """Wraps a data set: item ``(epoch, index)`` is ``base[index]`` with RNGs seeded per sample.

    Python's ``random``, NumPy's global RNG and torch's default generator are
    seeded from ``(seed, epoch, index)`` before the base data set's transform
    runs, so a sample's augmentation is the same in any process or worker.
    """

    def __init__(self, base: Dataset, seed: int) -> None:
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        random.seed(s)
        np.random.seed(s & 0xFFFFFFFF)
        torch.manual_seed(s)
        return self.base[index]


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's share of each global training batch, as ``(epoch, index)`` keys.

    Args:
        num_samples: size of the training set.
        batch_size: global batch; must be divisible by ``world_size``.
        rank: this process.
        world_size: number of processes.
        seed: seed of the epoch permutations.
        shuffle: permute each epoch (``False``: in order).

    Incomplete last batches are dropped, so every step has the full global batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(
                f"the global batch {batch_size} must be divisible by the {world_size} processes"
            )
        if num_samples < batch_size:
            raise DataError(
                f"the training set has {num_samples} images, fewer than one batch of {batch_size}"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.local_batch = batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.batch_size

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Iterate epoch ``epoch`` from its step ``start_step`` (resuming mid-epoch)."""
        self.epoch = epoch
        self.start_step = start_step

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            order = list(range(self.num_samples))
        for step in range(self.start_step, self.steps_per_epoch):
            lo = step * self.batch_size + self.rank * self.local_batch
            yield [(self.epoch, i) for i in order[lo : lo + self.local_batch]]


class EvalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Process ``rank`` evaluates indices ``rank, rank + W, ...`` in batches (no padding)."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, num_samples, world_size))
        self.local_batch = max(1, batch_size // world_size)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.local_batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for lo in range(0, len(self.indices), self.local_batch):
            yield [(0, i) for i in self.indices[lo : lo + self.local_batch]]


def _ignore_sigint(_: int) -> None:
    # Workers leave SIGINT / SIGTERM to the training process (it saves and stops cleanly).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class DataBundle:
    """Everything the trainer needs to know about the data.

    Attributes:
        train: training set (transform attached).
        val: validation set (transform attached).
        num_classes: number of classes.
        in_chans: image channels.
        img_size: model input side.
        mean: normalisation mean.
        std: normalisation std.
        classes: class names (label order).
        info: plain description saved with checkpoints (for ``eval`` / ``predict``).
        pin_memory: ``data.pin_memory`` (``None``: on for CUDA; :meth:`loader_options`).
        persistent_workers: ``data.persistent_workers`` (``None``: on with workers).
    """

    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    pin_memory: bool | None = None
    persistent_workers: bool | None = None
    _loaders: dict[str, tuple[tuple[Any, ...], DataLoader]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def loader_options(self, workers: int, device: torch.device | str | None) -> tuple[bool, bool]:
        """``(pin_memory, persistent_workers)`` for ``workers`` loader processes on ``device``.

        ``pin_memory``: ``data.pin_memory``, by default on when ``device`` is
        CUDA (pinned pages make ``.to(device, non_blocking=True)`` a real
        asynchronous copy), and never without CUDA. ``persistent_workers``:
        ``data.persistent_workers``, by default on when there are workers;
        never without (the main process loads).
        """
        on_cuda = device is not None and torch.device(device).type == "cuda"
        pin = on_cuda if self.pin_memory is None else self.pin_memory
        pin = pin and torch.cuda.is_available()
        persistent = workers > 0 if self.persistent_workers is None else self.persistent_workers
        return bool(pin), bool(persistent and workers > 0)

    def _loader(
        self,
        kind: str,
        key: tuple[Any, ...],
        dataset: Dataset,
        batch_sampler: Any,
        workers: int | None,
        device: torch.device | str | None,
    ) -> DataLoader:
        workers = auto_workers() if workers is None else workers
        pin, persistent = self.loader_options(workers, device)
        key = (*key, workers, pin, persistent)
        # A loader with persistent workers is kept and reused (every epoch asks for
        # one): its workers live as long as this bundle, instead of forking anew.
        hit = self._loaders.get(kind)
        if hit is not None and hit[0] == key:  # the sampler compares by identity
            return hit[1]
        loader = DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=workers,
            worker_init_fn=_ignore_sigint if workers else None,
            pin_memory=pin,
            persistent_workers=persistent,
        )
        if loader.persistent_workers:
            self._loaders[kind] = (key, loader)
        return loader

    def train_loader(
        self,
        sampler: TrainBatchSampler,
        workers: int | None,
        seed: int,
        device: torch.device | str | None = None,
    ) -> DataLoader:
        """A loader over ``sampler``'s batches of ``(images, labels)``.

        Args:
            sampler: the batches (its :meth:`~TrainBatchSampler.set_epoch` picks the epoch).
            workers: loader processes, ``None`` for :func:`auto_workers`.
            seed: the augmentation seed.
            device: where the batches go (pinned memory by default for CUDA).

        With persistent workers the same loader is returned for the same
        sampler and settings (the sampler is read in this process, so
        ``set_epoch`` still applies); data order and augmentation do not depend
        on it.
        """
        dataset = SeededDataset(self.train, seed)
        return self._loader("train", (sampler, seed), dataset, sampler, workers, device)

    def val_loader(
        self,
        batch_size: int,
        rank: int,
        world_size: int,
        workers: int | None,
        device: torch.device | str | None = None,
    ) -> DataLoader:
        """This process's shard of the validation set (every sample exactly once overall).

        ``device``, pinning and persistent workers: as :meth:`train_loader`.
        """
        sampler = EvalBatchSampler(len(self.val), batch_size, rank, world_size)
        key = (batch_size, rank, world_size)
        return self._loader("val", key, SeededDataset(self.val, 0), sampler, workers, device)


def auto_workers(cap: int = 8) -> int:
    """Loader workers for ``data.workers: null``: this process's share of the CPUs.

    ``min(cap, CPUs available // local processes - 1)``, at least 0 (the
    main process loads); the local processes come from torchrun's
    ``LOCAL_WORLD_SIZE`` (1 without it). Data order and augmentation do not
    depend on the number of workers, so runs stay reproducible.
    """
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(cap, cpus // local - 1))


def build_data(
    data: DataConfig,
    aug: AugConfig,
    model_cfg: dict[str, Any] | None = None,
    in_chans: int | None = None,
) -> DataBundle:
    """Load the recipe's data set and attach its transforms.

    Args:
        data: the recipe's data section.
        aug: the recipe's augmentation section.
        model_cfg: the model's timm ``pretrained_cfg`` (mean, std, crop_pct,
            interpolation) for image folders; ``None``: ImageNet defaults.
        in_chans: the input channels of the model the data is for (an existing
            one: evaluation); image folders are then read as grayscale for 1
            and RGB for 3 (unless ``data.img_mode`` says otherwise), and data
            with other channels is refused naming both. ``None``: the data
            decides (training builds the model from it).

    Returns:
        A :class:`DataBundle`.

    Raises:
        DatasetNotFoundError: Fashion-MNIST or scikit-learn missing (with the fix).
        DataError: bad folders or files (named), or data whose channels are
            not the model's ``in_chans``.
    """
    model_cfg = model_cfg or {}
    if data.dataset in ("fashion-mnist", "digits"):
        if data.dataset == "fashion-mnist":
            train = load_fashion_mnist(data.data_dir, "train")
            val = load_fashion_mnist(data.data_dir, "test")
        else:
            train, val = load_digits("train"), load_digits("test")
        if data.train_subset:
            train = train.subset(data.train_subset, seed=0)
        if data.val_subset:
            val = val.subset(data.val_subset, seed=1)
        mean, std = train.mean_std()
        img_size = data.img_size or train.image_size[0]
        classes, data_chans = train.classes, train.num_channels
        train.transform = build_train_transform(aug, img_size, mean, std)
        val.transform = build_eval_transform(
            img_size, mean, std, interpolation=aug.interpolation, center_crop=False
        )
        center_crop = False
        crop_pct = 1.0
    else:
        from pathlib import Path

        if not data.data_dir:
            raise DataError(
                "data.dataset='folder' needs data.data_dir (--data-dir): a root with "
                f"{data.train_split}/<class>/*.jpg and {data.val_split}/<class>/*.jpg"
            )
        root = Path(data.data_dir)
        if not root.is_dir():
            raise DataError(f"image-folder root not found: {root}")
        mode = _folder_mode(data.img_mode, in_chans)
        train_dir, val_dir = _split_path(root, data.train_split), _split_path(root, data.val_split)
        train_f = ImageFolder(train_dir, bad_images=data.bad_images, mode=mode)
        val_f = ImageFolder(
            val_dir,
            bad_images=data.bad_images,
            classes=train_f.classes,
            classes_from=str(train_dir),
            mode=mode,
        )
        if data.check_images:
            train_f.verify()
            val_f.verify()
        mean = _per_channel(model_cfg.get("mean", (0.485, 0.456, 0.406)), train_f.num_channels)
        std = _per_channel(model_cfg.get("std", (0.229, 0.224, 0.225)), train_f.num_channels)
        img_size = data.img_size or int(model_cfg.get("input_size", (3, 224, 224))[-1])
        crop_pct = aug.crop_pct or float(model_cfg.get("crop_pct", 0.875))
        train_f.transform = build_train_transform(aug, img_size, mean, std)
        val_f.transform = build_eval_transform(
            img_size, mean, std, crop_pct=crop_pct, interpolation=aug.interpolation
        )
        train, val = train_f, val_f
        classes, data_chans, center_crop = train_f.classes, train_f.num_channels, True
        train_subset = data.train_subset
        if train_subset and train_subset < len(train_f):
            g = torch.Generator().manual_seed(0)
            idx = torch.randperm(len(train_f), generator=g)[:train_subset].sort().values
            train = torch.utils.data.Subset(train_f, idx.tolist())
        if data.val_subset and data.val_subset < len(val_f):
            g = torch.Generator().manual_seed(1)
            idx = torch.randperm(len(val_f), generator=g)[: data.val_subset].sort().values
            val = torch.utils.data.Subset(val_f, idx.tolist())
    if in_chans is not None and data_chans != in_chans:
        raise DataError(
            f"the data ({data.dataset}) has {data_chans} channel(s), the model takes {in_chans}"
        )
    in_chans = data_chans
    info = dict(
        dataset=data.dataset,
        classes=list(classes),
        in_chans=in_chans,
        img_size=img_size,
        mean=list(mean),
        std=list(std),
        crop_pct=crop_pct,
        center_crop=center_crop,
        interpolation=aug.interpolation,
    )
    return DataBundle(
        train=train,
        val=val,
        num_classes=len(classes),
        in_chans=in_chans,
        img_size=img_size,
        mean=tuple(mean),
        std=tuple(std),
        classes=list(classes),
        info=info,
        pin_memory=data.pin_memory,
        persistent_workers=data.persistent_workers,
    )


def _split_path(root: Any, split: str) -> Any:
    """``root/split`` (a folder, or a tar file of that name), else ``root/split.tar``.

    Raises:
        DataError: neither exists (both paths named).
    """
    path = root / split
    if path.exists():
        return path
    tar = root / f"{split}.tar"
    if tar.is_file():
        return tar
    raise DataError(f"image folder not found: {path} (nor a tar file {tar})")


def _folder_mode(img_mode: str | None, in_chans: int | None) -> str:
    """The PIL mode image folders are read in: ``data.img_mode``, else the model's channels."""
    if img_mode is None:
        if in_chans not in (None, 1, 3):
            raise DataError(
                f"image folders are read as RGB (3 channels) or grayscale (1); "
                f"the model takes {in_chans} channels"
            )
        return "L" if in_chans == 1 else "RGB"
    want = 1 if img_mode == "L" else 3
    if in_chans is not None and in_chans != want:
        raise DataError(
            f"data.img_mode={img_mode} reads {want} channel(s), the model takes {in_chans}; "
            f"use data.img_mode={'L' if in_chans == 1 else 'RGB'} (or leave it unset)"
        )
    return img_mode


def _per_channel(values: Any, channels: int) -> tuple[float, ...]:
    """A normalisation mean / std for ``channels``: an RGB triple averaged for grayscale."""
    values = tuple(float(v) for v in values)
    if channels == 1 and len(values) == 3:
        return (sum(values) / 3,)
    return values
