"""Convert the authors' checkpoints into safetensors files our models load strictly.

:func:`convert_checkpoint` reads a checkpoint safely (``safetensors`` or
``torch.load(weights_only=True)``: no code from the file runs), applies the
model family's ``checkpoint_filter_fn`` (found through the module that
registered the timm name, e.g. :func:`acmix.models.resnet.checkpoint_filter_fn`),
checks every key and shape against the model built on the ``meta`` device
(no memory, no compute) and writes the result atomically::

    acmix convert ACmix_ResNet50.pth acmix_resnet50.safetensors --model acmix_resnet50

The output then loads with
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from timm.models import is_model, model_entrypoint
from torch import nn

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


class CheckpointError(ValueError):
    """A file is not a readable checkpoint, or does not fit the model."""


_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefix(key: str) -> str:
    """Strip ``module.`` ((Distributed)DataParallel) and ``_orig_mod.`` (torch.compile)."""
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A clean ``{key: tensor}`` state dict from a state dict or a training checkpoint.

    Unwraps ``{'state_dict': sd, ...}`` / ``{'model': sd, ...}`` (the authors'
    ResNet training saves ``{'epoch', 'arch', 'state_dict', 'best_acc1' (a
    tensor), 'optimizer', 'scheduler'}``, their Swin training ``{'model', ...}``;
    a state dict itself never maps those names to a dict) and strips the
    ``module.`` / ``_orig_mod.`` wrapper prefixes, as timm's loader does.

    Raises:
        ValueError: the result is empty or holds something other than tensors.
    """
    sd: Any = checkpoint
    while isinstance(sd, Mapping):
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping) or not sd:
        keys = list(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint)
        raise ValueError(
            "not a state dict: expected {name: tensor} or a training checkpoint with a "
            f"'state_dict' or 'model' entry, got {keys}"
        )
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"not a state dict: entries {bad[:8]} are not tensors")
    return {strip_wrapper_prefix(k): v for k, v in sd.items()}


def check_shapes(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    skip: Callable[[str], bool] = lambda key: False,
) -> None:
    """Raise ``ValueError`` naming every key whose shape differs between the two dicts.

    Keys present in only one of them are ignored (``load_state_dict`` reports those).
    """
    bad = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and not skip(k) and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise ValueError(
            f"{len(bad)} checkpoint tensor(s) have the wrong shape for this model "
            "(wrong variant or architecture kwargs?):\n  " + "\n  ".join(bad)
        )


def load_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint without executing code from it.

    ``*.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (tensors and plain containers only).

    Args:
        path: the file.

    Returns:
        What the file holds (a state dict or a training checkpoint dict), on CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file cannot be read as a checkpoint (truncated,
            corrupt, not a checkpoint, or holding pickled objects beyond tensors).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint (expected a PyTorch .pth/.pt state dict "
            f"or a .safetensors file; truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    except Exception as e:  # pickle.UnpicklingError and friends
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint: {type(e).__name__}: {e}"
        ) from e


def find_filter_fn(model_name: str) -> FilterFn | None:
    """The ``checkpoint_filter_fn`` of the module that registered ``model_name`` (or ``None``)."""
    module = sys.modules.get(model_entrypoint(model_name).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def _check_model_name(model_name: str) -> None:
    import acmix.models  # noqa: F401  (registers the models)

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
    # engine.checkpoint's atomic writer (temp file, fsync, read-back check, rename);
    # imported here because acmix.engine imports acmix.models at load time.
    from acmix.engine.checkpoint import atomic_write_bytes

    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dst, save(tensors, metadata=metadata))
    return tensors
