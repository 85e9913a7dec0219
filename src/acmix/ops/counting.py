"""Multiply-adds of elementwise backends, made visible to ``FlopCounterMode``.

``FlopCounterMode`` counts matmuls, convolutions and registered ops (the C++
kernels register their formulas), but zero for elementwise work, which is how
the ``"shift"`` and ``"reference"`` backends compute the local attention, the
patchwise aggregation and tensor shift-and-sum. Inside :func:`count_elementwise`
those ops call :func:`note_macs`, which runs the no-op ``acmix::macs`` op whose
FLOP formula is the MACs given; outside it nothing is called, so eager
speed, traced graphs and compiled graphs are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

__all__ = ["count_elementwise", "note_macs"]

_depth = [0]


@torch.library.custom_op("acmix::macs", mutates_args=())
def _macs(anchor: Tensor, macs: int) -> None:
    """No-op marker whose FLOP formula is ``2 * macs``."""


@_macs.register_fake
def _(anchor, macs):
    return None


@register_flop_formula(torch.ops.acmix.macs)
def _(anchor, macs, *args, **kwargs) -> int:
    return 2 * macs


@contextlib.contextmanager
def count_elementwise() -> Iterator[None]:
    """Within this context, elementwise backends report their multiply-adds to the counter."""
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1


def note_macs(anchor: Tensor, macs: int) -> None:
    """Report ``macs`` multiply-adds done elementwise.

    A no-op outside :func:`count_elementwise`, under tracing and under compilation.
    """
    if _depth[0] and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
        torch.ops.acmix.macs(anchor, int(macs))
