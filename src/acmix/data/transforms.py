"""Per-recipe transforms built from timm's data utilities.

Training (``PIL image -> normalised (C, H, W) float tensor``):

* ``crop="rrc"``: timm's ImageNet pipeline (:func:`timm.data.create_transform`):
  random resized crop, flip, colour jitter or an auto-augment policy
  (RandAugment ``"rand-m9-mstd0.5-inc1"``), normalisation, random erasing;
* ``crop="pad"`` (small images such as Fashion-MNIST): resize to the model
  size if needed, pad ``crop_padding`` pixels and crop back, flip, the same
  auto-augment / random-erasing blocks of timm;
* ``crop="none"``: resize, flip, the same blocks.

Evaluation: image folders use timm's resize + centre crop (``crop_pct``);
in-memory data sets only resize (if needed) and normalise. Mixup / cutmix and
label smoothing act on whole batches (:func:`build_mixup`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from timm.data import Mixup, create_transform
from timm.data.auto_augment import auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

if TYPE_CHECKING:
    from acmix.data.config import AugConfig

__all__ = ["build_eval_transform", "build_mixup", "build_train_transform"]

_INTERP = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


def _auto_augment(policy: str, img_size: int, mean: tuple[float, ...]) -> Callable:
    fill = tuple(min(255, round(255 * m)) for m in mean)
    hparams = dict(
        translate_const=int(img_size * 0.45), img_mean=fill[0] if len(fill) == 1 else fill
    )
    if policy.startswith("rand"):
        return rand_augment_transform(policy, hparams)
    if policy.startswith("original") or policy.startswith("v0"):
        return auto_augment_transform(policy, hparams)
    raise ValueError(f"aug.auto_augment must start with 'rand', 'original' or 'v0', got {policy!r}")


def build_train_transform(
    aug: AugConfig,
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> Callable:
    """The training transform of ``aug`` at ``img_size`` (see the module docstring).

    Args:
        aug: the recipe's augmentation section.
        img_size: output side ``S``; the result is ``(C, S, S)``.
        mean: per-channel normalisation mean (length C).
        std: per-channel normalisation std (length C).

    Returns:
        ``PIL.Image -> torch.Tensor (C, S, S)``.
    """
    if aug.crop == "rrc":
        return create_transform(
            img_size,
            is_training=True,
            scale=aug.scale,
            ratio=aug.ratio,
            hflip=aug.hflip,
            color_jitter=aug.color_jitter or 0.0,
            auto_augment=aug.auto_augment,
            interpolation=aug.interpolation,
            mean=mean,
            std=std,
            re_prob=aug.re_prob,
            re_mode=aug.re_mode,
            re_count=aug.re_count,
        )
    steps: list[Callable] = [
        T.Resize((img_size, img_size), interpolation=_INTERP[aug.interpolation])
    ]
    if aug.crop == "pad" and aug.crop_padding > 0:
        steps.append(T.RandomCrop(img_size, padding=aug.crop_padding))
    if aug.hflip > 0:
        steps.append(T.RandomHorizontalFlip(aug.hflip))
    if aug.auto_augment:
        steps.append(_auto_augment(aug.auto_augment, img_size, mean))
    elif aug.color_jitter:
        steps.append(T.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
    steps += [T.ToTensor(), T.Normalize(mean, std)]
    if aug.re_prob > 0:
        steps.append(
            RandomErasing(aug.re_prob, mode=aug.re_mode, max_count=aug.re_count, device="cpu")
        )
    return T.Compose(steps)


def build_eval_transform(
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    *,
    crop_pct: float | None = None,
    interpolation: str = "bilinear",
    center_crop: bool = True,
) -> Callable:
    """The evaluation transform: resize (+ centre crop for photos) and normalise.

    Args:
        img_size: output side ``S``.
        mean: per-channel mean.
        std: per-channel std.
        crop_pct: centre-crop fraction (timm's; resize to ``S / crop_pct`` first).
        interpolation: resize interpolation.
        center_crop: ``True`` for image folders (timm's eval pipeline);
            ``False`` for in-memory data (resize only).

    Returns:
        ``PIL.Image -> torch.Tensor (C, S, S)``.
    """
    if center_crop:
        return create_transform(
            img_size,
            is_training=False,
            interpolation=interpolation,
            mean=mean,
            std=std,
            crop_pct=crop_pct,
        )
    return T.Compose(
        [
            T.Resize((img_size, img_size), interpolation=_INTERP[interpolation]),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def build_mixup(aug: AugConfig, num_classes: int) -> Mixup | None:
    """timm's batch mixup / cutmix (with label smoothing) if the recipe asks for it, else ``None``.

    The returned callable maps ``(x (B, C, H, W), y (B,))`` to mixed images and
    soft targets ``(B, num_classes)``; it needs an even per-process batch.
    """
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix,
        prob=aug.mixup_prob,
        switch_prob=aug.mixup_switch_prob,
        mode="batch",
        label_smoothing=aug.label_smoothing,
        num_classes=num_classes,
    )
