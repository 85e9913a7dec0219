"""Argument validation in one place.

Every public layer and functional op normalises and checks its arguments
here, so that the same mistake always produces the same message: the bad
value, and what was expected instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch

PaddingMode = Literal["reflect", "zeros", "auto"]
PADDING_MODES: tuple[str, ...] = ("reflect", "zeros", "auto")


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an int, or raise if it is not an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_odd_kernel(name: str, value: object) -> int:
    """Return ``value`` if it is an odd integer >= 1 (a kernel with a centre)."""
    value = check_positive_int(name, value)
    if value % 2 == 0:
        raise ValueError(
            f"{name} must be odd (a window centred on its pixel), got {value}; "
            f"use {value - 1} or {value + 1}"
        )
    return value


def check_heads(out_planes: int, head: int) -> int:
    """Return the head dimension ``out_planes // head`` after checking divisibility."""
    check_positive_int("out_planes", out_planes)
    check_positive_int("head", head)
    if out_planes % head != 0:
        divisors = [h for h in range(1, out_planes + 1) if out_planes % h == 0]
        raise ValueError(
            f"out_planes ({out_planes}) must be divisible by head ({head}); "
            f"valid head counts for {out_planes} channels: {divisors}"
        )
    return out_planes // head


def check_padding_mode(mode: str) -> str:
    """Check the attention padding mode name."""
    if mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {mode!r}")
    return mode


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Check that ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_float_tensor(name: str, x: object, ndim: int, layout: str) -> torch.Tensor:
    """Check that ``x`` is a real floating-point tensor of rank ``ndim``, non-empty but the batch.

    Args:
        name: argument name for the message.
        x: the value to check.
        ndim: expected rank.
        layout: human-readable layout, e.g. ``"(B, C, H, W)"``; dimension 0 is the
            batch, which may be empty; every other dimension must be >= 1.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if not x.is_floating_point():  # complex tensors too: the layers are real-valued
        raise TypeError(
            f"{name} must be a real floating-point tensor, got dtype {x.dtype}; "
            f"convert it first, e.g. x.float()"
        )
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(x.shape)}")
    if any(n == 0 for n in x.shape[1:]):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} {layout}: every dimension but the batch must "
            "be >= 1"
        )
    return x


def check_channels(name: str, got: int, expected: int, layout: str) -> None:
    """Raise if a channel count differs from the one the layer was built for."""
    if got != expected:
        raise ValueError(
            f"{name} has {got} channels but the layer expects {expected} (layout {layout})"
        )


_MASKED_MAPS: list[list[tuple[int, int, int]]] = []


@contextlib.contextmanager
def record_masked_maps() -> Iterator[list[tuple[int, int, int]]]:
    """Collect ``(kernel, height, width)`` of every map ``"auto"`` pads with masked zeros.

    A trace (``torch.jit.trace``, ONNX export) keeps the choice made at the
    traced size, so a graph with dynamic height and width is exact only where
    no map switches between masked and reflection padding; the exporter uses
    this to find the smallest traced size for which that holds.

    Yields:
        The list the choices made inside the block are appended to.
    """
    found: list[tuple[int, int, int]] = []
    _MASKED_MAPS.append(found)
    try:
        yield found
    finally:
        _MASKED_MAPS.remove(found)


def resolve_padding(mode: str, kernel: int, height: int, width: int) -> str:
    """Decide the effective padding for a map of ``height`` x ``width``.

    Reflection padding by ``kernel // 2`` needs ``kernel // 2 < height`` and
    ``< width``. ``"reflect"`` raises when that does not hold, ``"auto"``
    falls back to ``"zeros"`` (masked) for such small maps only (recorded by
    :func:`record_masked_maps`).
    """
    pad = kernel // 2
    fits = pad < height and pad < width
    if mode == "auto":
        if not fits and _MASKED_MAPS:
            _MASKED_MAPS[-1].append((kernel, height, width))
        return "reflect" if fits else "zeros"
    if mode == "reflect" and not fits:
        raise ValueError(
            f"the {height}x{width} map is too small for reflection padding of the "
            f"{kernel}x{kernel} attention window (needs height and width > {pad}); "
            f"use padding_mode='zeros' (out-of-image keys masked) or 'auto' "
            f"(reflect where possible, masked otherwise), or a smaller kernel_att"
        )
    return mode
