"""The data's configuration sections: :class:`DataConfig` and :class:`AugConfig`.

The data package owns them (its loaders and transforms read them); the
engine's :class:`acmix.engine.config.Config` composes them with its own
sections and re-exports them. Each section validates itself on construction
and raises :class:`~acmix.utils.config.ConfigError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from acmix.utils.config import (
    ConfigError,
    check_config_choice,
    check_config_finite,
    check_config_range,
)

__all__ = ["DATASETS", "IMG_MODES", "AugConfig", "DataConfig"]

#: The ``data.dataset`` values.
DATASETS: tuple[str, ...] = ("fashion-mnist", "digits", "folder")


IMG_MODES: tuple[str, ...] = ("RGB", "L")  # PIL modes of image folders: 3 or 1 channel


@dataclass
class DataConfig:
    """The data set and its loaders.

    Attributes:
        dataset: ``"fashion-mnist"`` (the embedded default, from the Debian
            package ``dataset-fashion-mnist``), ``"digits"`` (scikit-learn's
            bundled 8x8 digits) or ``"folder"`` (ImageNet-style
            ``data_dir/<split>/<class>/*.jpg``, or a tar file
            ``data_dir/<split>.tar`` of ``<class>/*.jpg`` members, or
            ``data_dir/<split>/<class>.tar``: timm's readers).
        data_dir: the Fashion-MNIST IDX directory (default: the Debian
            package's) or the image-folder root.
        train_split: sub-folder of ``data_dir`` with the training images.
        val_split: sub-folder of ``data_dir`` with the validation images.
        img_size: model input side; ``None``: the data's own (28 for
            Fashion-MNIST, 8 for digits, 224 for folders).
        train_subset: use this many training images (a fixed random subset).
        val_subset: use this many validation images (``None``: all).
        batch_size: global batch (all processes together).
        eval_batch_size: global evaluation batch.
        workers: data-loader worker processes per training process; ``None``:
            this machine's share, ``min(8, CPUs // local processes - 1)`` (what
            the ImageNet recipes use, so they fit the machine they run on).
        check_images: open every image once at start; unreadable ones are
            skipped and counted (with ``bad_images="skip"``).
        bad_images: ``"skip"`` (an unreadable image is replaced by the next
            readable one and reported) or ``"error"``.
        img_mode: how image folders are read (timm's ``--input-img-mode``):
            ``"RGB"`` (3 channels) or ``"L"`` (grayscale, 1 channel); ``None``:
            follow the model's ``in_chans`` where one is given (``acmix eval``
            of a 1-channel checkpoint reads grayscale), else RGB.
        pin_memory: copy batches into pinned (page-locked) memory, so the copy
            to the GPU overlaps the step; ``None``: on when training or
            evaluating on CUDA. Never without CUDA.
        persistent_workers: keep the loader's worker processes (and their
            copy of the data set) alive between epochs instead of starting them
            anew each epoch; ``None``: on when there are workers. Needs
            ``workers`` > 0 (or ``None``); with ``workers: 0`` it is an error.
    """

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    img_size: int | None = None
    train_subset: int | None = None
    val_subset: int | None = None
    batch_size: int = 128
    eval_batch_size: int = 500
    workers: int | None = 0
    check_images: bool = False
    bad_images: str = "skip"
    img_mode: str | None = None
    pin_memory: bool | None = None
    persistent_workers: bool | None = None

    def __post_init__(self) -> None:
        check_config_finite("data", self)
        check_config_choice("data.dataset", self.dataset, DATASETS)
        check_config_choice("data.bad_images", self.bad_images, ("skip", "error"))
        if self.img_mode is not None:
            check_config_choice("data.img_mode", self.img_mode, IMG_MODES)
        for key in ("batch_size", "eval_batch_size"):
            check_config_range(f"data.{key}", getattr(self, key), 1)
        for key in ("img_size", "train_subset", "val_subset"):
            if getattr(self, key) is not None:
                check_config_range(f"data.{key}", getattr(self, key), 1)
        if self.workers is not None:
            check_config_range("data.workers", self.workers, 0)
        if self.persistent_workers and self.workers == 0:
            raise ConfigError(
                "data.persistent_workers=true needs loader workers: set data.workers > 0 "
                "(or null), or leave data.persistent_workers unset"
            )


@dataclass
class AugConfig:
    """Training augmentation (timm's data utilities) and label smoothing.

    Attributes:
        crop: ``"rrc"`` (random resized crop, the ImageNet recipes), ``"pad"``
            (pad ``crop_padding`` pixels and crop back: small images) or
            ``"none"``.
        crop_padding: padding of ``crop="pad"``.
        scale: area range of ``crop="rrc"``.
        ratio: aspect range of ``crop="rrc"``.
        hflip: horizontal-flip probability.
        auto_augment: a timm policy string, e.g. ``"rand-m9-mstd0.5-inc1"``
            (RandAugment, magnitude 9).
        color_jitter: colour-jitter strength (``None``: off).
        interpolation: resize interpolation (``"bilinear"``, ``"bicubic"``).
        crop_pct: evaluation centre-crop fraction (``None``: the model's).
        re_prob: random-erasing probability.
        re_mode: random-erasing fill (``"pixel"``, ``"rand"``, ``"const"``).
        re_count: erased boxes per image.
        mixup: mixup alpha (0: off).
        cutmix: cutmix alpha (0: off).
        mixup_prob: probability of mixing a batch.
        mixup_switch_prob: probability of cutmix instead of mixup when both are on.
        label_smoothing: label smoothing of the loss.
    """

    crop: str = "pad"
    crop_padding: int = 2
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = None
    color_jitter: float | None = None
    interpolation: str = "bilinear"
    crop_pct: float | None = None
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_count: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        check_config_finite("aug", self)
        check_config_choice("aug.crop", self.crop, ("rrc", "pad", "none"))
        check_config_choice(
            "aug.interpolation", self.interpolation, ("bilinear", "bicubic", "nearest")
        )
        check_config_choice("aug.re_mode", self.re_mode, ("pixel", "rand", "const"))
        for key in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
            check_config_range(f"aug.{key}", getattr(self, key), 0.0, 1.0)
        check_config_range("aug.label_smoothing", self.label_smoothing, 0.0, 0.99)
        check_config_range("aug.mixup", self.mixup, 0.0)
        check_config_range("aug.cutmix", self.cutmix, 0.0)
        check_config_range("aug.crop_padding", self.crop_padding, 0)
        if self.crop_pct is not None:
            check_config_range("aug.crop_pct", self.crop_pct, 0.01, 1.0)
        if self.color_jitter is not None:
            check_config_range("aug.color_jitter", self.color_jitter, 0.0)
        for key, hi in (("scale", 1.0), ("ratio", None)):
            lo_v, hi_v = getattr(self, key)
            check_config_range(f"aug.{key}[0]", lo_v, 0.0, hi, lo_open=True)
            check_config_range(f"aug.{key}[1]", hi_v, lo_v, hi)
