"""Convert the authors' checkpoints into safetensors files our models load strictly.

:func:`convert_checkpoint` reads a checkpoint safely (``safetensors`` or
``torch.load(weights_only=True)``: no code from the file runs), applies the
model family's ``checkpoint_filter_fn`` (found through the module that
registered the timm name, e.g. :func:`acmix.models.resnet.checkpoint_filter_fn`),
checks every key and shape against the model built on the ``meta`` device
(no memory, no compute) and writes the result atomically::

    acmix convert ACmix_ResNet50.pth acmix_resnet50.safetensors --model acmix_resnet50

Reading, unwrapping and the atomic write are :mod:`acmix.utils.io`'s (re-exported
here). The output then loads with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=dst))``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save
from timm.models import is_model, model_entrypoint
from torch import nn

from acmix.utils.io import (
    CheckpointError,
    atomic_write_bytes,
    check_shapes,
    load_checkpoint_file,
    strip_wrapper_prefix,
    unwrap_state_dict,
)

__all__ = [
    "CheckpointError",
    "check_shapes",
    "convert_checkpoint",
    "find_filter_fn",
    "load_checkpoint_file",
    "strip_wrapper_prefix",
    "unwrap_state_dict",
]

FilterFn = Callable[[Mapping[str, Any], nn.Module], dict[str, torch.Tensor]]


def find_filter_fn(model_name: str) -> FilterFn | None:
    """The ``checkpoint_filter_fn`` of the module that registered ``model_name`` (or ``None``)."""
    module = sys.modules.get(model_entrypoint(model_name).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _check_model_name(model_name: str) -> None:
    if not is_model(model_name):
        raise ValueError(
            f"unknown model {model_name!r}; ACmix models: {timm.list_models('acmix_*')}"
        )


def _check_against(state_dict: Mapping[str, Any], target: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` listing missing / unexpected keys and wrong shapes."""
    problems: list[str] = []
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        problems.append(f"not tensors: {bad[:10]}")
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:10]}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {unexpected[:10]}")
    for k, v in state_dict.items():
        if k in target and isinstance(v, torch.Tensor) and v.shape != target[k].shape:
            problems.append(
                f"{k}: shape {tuple(v.shape)} in the checkpoint, {tuple(target[k].shape)} expected"
            )
    if problems:
        raise CheckpointError("checkpoint does not fit the model:\n  " + "\n  ".join(problems))


def convert_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    model_name: str,
    **model_kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Convert an authors' checkpoint for ``model_name`` into a safetensors file.

    Args:
        src: the authors' checkpoint (``.pth`` / ``.pt`` / ``.safetensors``; a
            state dict or ``{'state_dict': ...}`` / ``{'model': ...}``).
        dst: output ``.safetensors`` path (written atomically; parent dirs created).
        model_name: a registered timm name, e.g. ``"acmix_resnet50"``.
        **model_kwargs: architecture kwargs of the checkpoint's model
            (``num_classes``, ``layers``, ...), as for ``timm.create_model``.

    Returns:
        The converted state dict that was written (tensors as in the source, on CPU).

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: unknown ``model_name``.
        CheckpointError: ``src`` is not a checkpoint, or its keys / shapes do not
            fit the model (the message names each key, the shape found and the
            shape expected). ``dst`` is left untouched.
    """
    src, dst = Path(src), Path(dst)
    _check_model_name(model_name)
    raw = load_checkpoint_file(src)
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{str(src)!r} is not a checkpoint: it holds a {type(raw).__name__}, "
            "expected a state dict (dict of tensors)"
        )
    with torch.device("meta"):
        model = timm.create_model(model_name, **model_kwargs)
    filter_fn = find_filter_fn(model_name)
    try:
        # As timm's loader does before a filter runs: unwrap, strip wrapper prefixes.
        state_dict = unwrap_state_dict(raw)
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model)
    except ValueError as e:
        raise CheckpointError(f"{str(src)!r} does not fit {model_name}: {e}") from e
    try:
        _check_against(state_dict, model.state_dict())
    except CheckpointError as e:
        raise CheckpointError(f"{str(src)!r} does not fit {model_name}: {e}") from e
    # safetensors needs contiguous tensors that share no storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    metadata = {"format": "pt", "model": model_name, "source": src.name}
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dst, save(tensors, metadata=metadata))
    return tensors
