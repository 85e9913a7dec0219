"""Small pieces every backbone family shares (one implementation each)."""

from __future__ import annotations

import torch
from torch import nn

#: ACmix's mix weights alpha / beta: never weight-decayed.
MIX_WEIGHT_SUFFIXES: tuple[str, ...] = ("rate1", "rate2")


def no_decay_names(model: nn.Module, extra_suffixes: tuple[str, ...] = ()) -> set[str]:
    """Parameter names without weight decay: alpha / beta plus ``extra_suffixes``."""
    ends = MIX_WEIGHT_SUFFIXES + tuple(extra_suffixes)
    return {n for n, _ in model.named_parameters() if n.endswith(ends)}


def check_image_input(x: torch.Tensor, in_chans: int, min_size: int, why: str) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(B, in_chans, H, W)`` with ``H, W >= min_size``.

    Args:
        x: the model input.
        in_chans: expected channels.
        min_size: smallest H and W the network accepts.
        why: the reason for ``min_size``, for the message.
    """
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected input (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if x.shape[-2] < min_size or x.shape[-1] < min_size:
        raise ValueError(
            f"input {x.shape[-2]}x{x.shape[-1]} is too small: {why}, "
            f"so H and W must be >= {min_size}"
        )
