"""Small pieces every backbone family shares (one implementation each).

The five families (ResNet, SAN, PVT, Swin, tiny) build their timm cfgs with
:func:`model_cfg`, their models with :func:`build_model` (``features_only``
through timm's ``FeatureGetterNet``, i.e. each family's
``forward_intermediates`` / ``prune_intermediate_layers``), and their
stochastic-depth schedules with :func:`drop_path_rates`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg

# timm exports feature_take_indices from no public module (it is in the __all__ of
# timm.models._features, where timm's own models take it); this is its only import here.
from timm.models._features import feature_take_indices
from torch import nn

from acmix.layers.acmix import is_fx_tracing
from acmix.models._checkpoint import checkpoint_seq

__all__ = [
    "MIX_WEIGHT_SUFFIXES",
    "build_model",
    "check_image_input",
    "drop_path_rates",
    "feature_take_indices",
    "model_cfg",
    "no_decay_names",
    "stage_intermediates",
]

ModelT = TypeVar("ModelT", bound=nn.Module)

#: The paper every registered variant belongs to (pretrained-cfg metadata).
PAPER_IDS = "arXiv:2111.14556"
PAPER_NAME = "On the Integration of Self-Attention and Convolution"

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

    Under a ``torch.fx`` symbolic trace the shape is symbolic and the check
    is skipped (a traced graph runs it at no point; the layers' own checks
    run inside their single traced call).
    """
    if is_fx_tracing():
        return
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected input (B, {in_chans}, H, W), got shape {tuple(x.shape)}")
    if x.shape[-2] < min_size or x.shape[-1] < min_size:
        raise ValueError(
            f"input {x.shape[-2]}x{x.shape[-1]} is too small: {why}, "
            f"so H and W must be >= {min_size}"
        )


def drop_path_rates(
    rate: float, depths: Sequence[int], *, linspace: bool = False
) -> list[list[float]]:
    """Stochastic-depth rate of every block, per stage: linear from 0 to ``rate`` over all blocks.

    Args:
        rate: the rate of the last block.
        depths: blocks per stage.
        linspace: compute the schedule as ``torch.linspace(0, rate, n)`` does (in the
            default dtype; Swin's official schedule, whose float32 values the Swin
            family keeps) instead of exactly in Python floats (``rate * i / (n - 1)``).

    Returns:
        ``depths[s]`` rates for each stage ``s`` (a single block gets 0).
    """
    n = sum(depths)
    if linspace:
        flat = torch.linspace(0, rate, n, device="cpu").tolist()
    else:
        flat = [rate * i / max(n - 1, 1) for i in range(n)]
    out, start = [], 0
    for depth in depths:
        out.append(flat[start : start + depth])
        start += depth
    return out


def stage_intermediates(
    stem: Callable[[torch.Tensor], torch.Tensor],
    stages: Sequence[nn.Module],
    x: torch.Tensor,
    levels: int,
    indices: int | list[int] | None,
    *,
    stop_early: bool,
    intermediates_only: bool,
    grad_checkpointing: bool,
) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
    """The body of ``forward_intermediates`` where each stage is one feature level (ResNet, tiny).

    Args:
        stem: the layers before the first stage (run after ``indices`` is checked).
        stages: the NCHW stages, in order.
        x: the model's input.
        levels: number of feature levels (``len(model.feature_info)``).
        indices: levels to return (timm's ``feature_take_indices``).
        stop_early: run no stage after the last requested one.
        intermediates_only: return only the list of stage outputs.
        grad_checkpointing: checkpoint each stage's blocks (:func:`checkpoint_seq`).

    Returns:
        The requested stage outputs, or ``(final, outputs)`` with ``final`` the
        last stage run's output.
    """
    take, max_index = feature_take_indices(levels, indices)
    if stop_early and not torch.jit.is_scripting():
        stages = stages[: max_index + 1]
    x = stem(x)
    out: list[torch.Tensor] = []
    for i, stage in enumerate(stages):
        if grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(stage, x)
        else:
            x = stage(x)
        if i in take:
            out.append(x)
    return out if intermediates_only else (x, out)


def model_cfg(
    *,
    first_conv: str,
    classifier: str,
    pool_size: tuple[int, int] | None = (7, 7),
    crop_pct: float = 0.875,
    interpolation: str = "bilinear",
    **kwargs: Any,
) -> dict[str, Any]:
    """A complete timm pretrained cfg of one variant (no weights: ``url`` is empty).

    Every key timm's registry-wide tests read is set: ``input_size`` 224x224,
    ``pool_size`` (the unpooled feature map at ``input_size``; ``None`` for a
    token-sequence output, as timm's class-token models declare it),
    ``crop_pct``, ``interpolation``, ImageNet ``mean`` / ``std``, ``first_conv``
    and ``classifier`` (module names), 1000 classes, any input size.

    Args:
        first_conv: name of the first convolution (``in_chans`` adaptation).
        classifier: name of the classifier module.
        pool_size: the unpooled feature map ``(h, w)`` at 224x224, or ``None``.
        crop_pct: evaluation centre-crop fraction.
        interpolation: evaluation resize interpolation.
        **kwargs: further cfg fields (``notes``, ``origin_url``, ``custom_load``, ...),
            or overrides.

    Returns:
        The cfg dict for :func:`timm.models.generate_default_cfgs`.
    """
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": pool_size,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": first_conv,
        "classifier": classifier,
        "fixed_input_size": False,
        "license": "mit",
        "paper_ids": PAPER_IDS,
        "paper_name": PAPER_NAME,
        **kwargs,
    }


def build_model(
    model_cls: Callable[..., ModelT],
    variant: str,
    pretrained: bool = False,
    *,
    pretrained_filter_fn: Callable[..., Any] | None = None,
    feature_levels: int = 4,
    **kwargs: Any,
) -> ModelT:
    """Build a registered variant through timm's ``build_model_with_cfg``.

    ``features_only=True`` wraps the model in timm's ``FeatureGetterNet``
    (``feature_cls="getter"``): it prunes the model with
    ``prune_intermediate_layers`` and returns ``forward_intermediates(x,
    indices=out_indices, intermediates_only=True)``. ``out_indices`` (default:
    all ``feature_levels`` levels) is taken from ``kwargs`` whether or not
    ``features_only`` is set.

    Args:
        model_cls: the family's model class.
        variant: the registered name (selects the pretrained cfg).
        pretrained: load weights (a local file through ``pretrained_cfg_overlay``).
        pretrained_filter_fn: maps a checkpoint onto the model's state dict.
        feature_levels: number of feature levels (entries of ``model.feature_info``).
        **kwargs: model arguments and timm's builder options.

    Returns:
        The model, or its feature extractor for ``features_only=True``.
    """
    out_indices = kwargs.pop("out_indices", tuple(range(feature_levels)))
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        pretrained_filter_fn=pretrained_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )
