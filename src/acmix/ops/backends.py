"""One backend choice for every op: :func:`choose_backend`.

Every op of :mod:`acmix.ops` validates its arguments once, then asks
``choose_backend(op, tensors, requested, **facts)`` which implementation runs.
The vocabulary is one for all ops (:data:`BACKENDS`):

* ``"auto"``: the first implementation in the op's preference order
  (:data:`OP_BACKENDS`) that can run on these tensors;
* a backend the op implements: that one, or a :class:`BackendError` that says
  why it cannot run here;
* a backend the op does not implement (e.g. ``"sdpa"`` for the convolution
  path of a layer whose window attention uses SDPA): the op chooses as under
  ``"auto"``. The result is the same function either way; the debug log says so.

Each backend module (:mod:`~acmix.ops.reference`, :mod:`~acmix.ops.shift`,
:mod:`~acmix.ops.sdpa`, :mod:`~acmix.ops.cpp`, :mod:`~acmix.ops.triton_backend`)
answers for itself through an ``unavailable(op, tensors, facts) -> str | None``
function: ``None`` when it can run, else the reason. With
``logging.getLogger("acmix.ops")`` at DEBUG, every choice is logged with the
reason each skipped backend gave.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from acmix.ops import cpp, reference, sdpa, shift, triton_backend

__all__ = ["BACKENDS", "OP_BACKENDS", "BackendError", "choose_backend", "explain_backend"]

logger = logging.getLogger("acmix.ops")

#: Every backend name an op accepts.
BACKENDS: tuple[str, ...] = ("auto", "cpp", "triton", "shift", "sdpa", "reference")

#: Each op's implementations, in the order ``"auto"`` tries them. ``"composed"``
#: (stage II only) runs the attention and the convolution path as their own ops.
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "local_attention": ("cpp", "triton", "shift", "reference"),
    "conv_path": ("cpp", "reference"),
    "acmix_stage2": ("cpp", "composed"),
    "window_attention": ("sdpa", "reference"),
    "patchwise_aggregate": ("shift", "reference"),
    "shift_sum": ("shift", "reference"),
}

Check = Callable[[str, Sequence[torch.Tensor], dict[str, Any]], "str | None"]


def _always(op: str, tensors: Sequence[torch.Tensor], facts: dict[str, Any]) -> str | None:
    return None


_CHECKS: dict[str, Check] = {
    "cpp": cpp.unavailable,
    "triton": triton_backend.unavailable,
    "shift": shift.unavailable,
    "sdpa": sdpa.unavailable,
    "reference": reference.unavailable,
    "composed": _always,
}


class BackendError(ValueError, RuntimeError):
    """A requested backend cannot run on these inputs (the message says why)."""


def explain_backend(
    op: str,
    tensors: Sequence[torch.Tensor],
    requested: str = "auto",
    **facts: Any,
) -> tuple[str | None, dict[str, str]]:
    """The backend :func:`choose_backend` would pick, and why each other one was skipped.

    Returns:
        ``(backend or None, {skipped backend: reason})``; ``None`` when nothing can
        run (only possible for a strictly requested backend).
    """
    if op not in OP_BACKENDS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(OP_BACKENDS)}")
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    impls = OP_BACKENDS[op]
    strict = requested != "auto" and requested in impls
    candidates = (requested,) if strict else impls
    reasons: dict[str, str] = {}
    if requested != "auto" and not strict and "composed" in impls:
        # A composite op (acmix_stage2) runs a request it has no form of its own for as
        # its parts, each of which gets the request: backend="reference" must reach the
        # reference attention and conv path, not the fused kernel "auto" would pick.
        candidates = ("composed",)
        reasons[requested] = f"{op} has no {requested!r} form; composed of ops that take it"
    elif requested != "auto" and not strict:
        reasons[requested] = f"{op} has no {requested!r} implementation; chosen as under 'auto'"
    for name in candidates:
        why = _CHECKS[name](op, tensors, facts)
        if why is None:
            return name, reasons
        reasons[name] = why
    return None, reasons


def choose_backend(
    op: str,
    tensors: Sequence[torch.Tensor],
    requested: str = "auto",
    **facts: Any,
) -> str:
    """Pick the implementation of ``op`` for these tensors.

    Args:
        op: a key of :data:`OP_BACKENDS`.
        tensors: the op's tensor inputs (device, dtype and layout are read from them).
        requested: one of :data:`BACKENDS`.
        **facts: op-specific facts the backends need (``weight="mlp"``,
            ``stride=2``, ``layout="channels_last"``, ``grouped=False``, ...).

    Returns:
        The backend name (a member of ``OP_BACKENDS[op]``).

    Raises:
        BackendError: ``requested`` is implemented by ``op`` but cannot run here.
    """
    name, reasons = explain_backend(op, tensors, requested, **facts)
    if name is None:
        why = "; ".join(f"{k}: {v}" for k, v in reasons.items())
        raise BackendError(f"{op}: backend={requested!r} cannot run here ({why})")
    if not torch.compiler.is_compiling() and logger.isEnabledFor(logging.DEBUG):
        skipped = ", ".join(f"{k} ({v})" for k, v in reasons.items()) or "none"
        logger.debug("%s: %s (requested %r; skipped: %s)", op, name, requested, skipped)
    return name
