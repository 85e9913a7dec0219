"""Activation (gradient) checkpointing that runs each normalisation's statistics update once.

``set_grad_checkpointing(True)`` makes a model keep only the inputs of its
blocks and run each block's forward a second time in the backward pass, to
recompute the activations it did not keep. In training mode a BatchNorm
updates its running statistics on every forward, so with plain
``torch.utils.checkpoint`` (and timm's ``checkpoint_seq``, which wraps it)
every step updates them twice: ``num_batches_tracked`` counts two per step
and the running mean / variance take two momentum steps per batch, so
evaluation sees other statistics than training without checkpointing.

The recomputation must be a pure replay. :func:`checkpoint` and
:func:`checkpoint_seq` (drop-ins for timm's, used by every family) pass
``torch.utils.checkpoint`` a ``context_fn`` whose recompute context snapshots
the running statistics (``running_mean``, ``running_var``,
``num_batches_tracked``) of every norm layer inside the checkpointed modules
and restores them when the recomputation ends. The recomputed forward still
normalises with the batch statistics, exactly as the first forward did, so
the gradients are unchanged; only the duplicate buffer update is undone.
(Snapshot-and-restore rather than switching ``track_running_stats`` off: it
also covers code that updates a norm's buffers itself, as SAN's frugal
first layer does.) The cost is a copy of a few vectors per layer per step.

The checkpointing is always the non-reentrant form (``context_fn`` needs it).
Under ``torch.compile`` the context is not passed (dynamo accepts only
constant ones): there the partitioner recomputes only pure operations and the
traced forward's buffer updates are applied once (checked on ``acmix_tiny``:
the running statistics equal those of an eager run without checkpointing).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = ["checkpoint", "checkpoint_seq"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _modules_of(functions: Iterable[Any]) -> list[nn.Module]:
    """The modules a checkpointed callable runs: a module, a bound method's, a partial's."""
    out = []
    for f in functions:
        while isinstance(f, functools.partial):
            f = f.func
        owner = f if isinstance(f, nn.Module) else getattr(f, "__self__", None)
        if isinstance(owner, nn.Module):
            out.append(owner)
    return out


def _running_stats(modules: Sequence[nn.Module]) -> list[tuple[nn.Module, str]]:
    seen: set[int] = set()
    out = []
    for root in modules:
        for m in root.modules():
            if id(m) in seen or not isinstance(getattr(m, "running_mean", None), torch.Tensor):
                continue
            seen.add(id(m))
            out += [
                (m, name) for name in _STATS if isinstance(getattr(m, name, None), torch.Tensor)
            ]
    return out


@contextlib.contextmanager
def _replay(stats: list[tuple[nn.Module, str]]) -> Iterator[None]:
    """Undo, at exit, every change the block makes to the norms' running statistics."""
    with torch.no_grad():
        saved = [getattr(m, name).clone() for m, name in stats]
    try:
        yield
    finally:
        with torch.no_grad():
            for (m, name), value in zip(stats, saved, strict=True):
                getattr(m, name).copy_(value)


def _context_fn(modules: Sequence[nn.Module]) -> Callable[[], tuple[Any, Any]] | None:
    if torch.compiler.is_compiling():
        return None
    stats = _running_stats(modules)
    if not stats:
        return None
    return lambda: (contextlib.nullcontext(), _replay(stats))


def _run_checkpointed(
    function: Callable[..., Any], modules: Sequence[nn.Module], *args: Any, **kwargs: Any
) -> Any:
    """Non-reentrant ``torch.utils.checkpoint.checkpoint`` replaying ``modules``' norms purely."""
    context_fn = _context_fn(modules)
    extra = {"context_fn": context_fn} if context_fn is not None else {}
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, **extra, **kwargs
    )


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(function, *args)`` whose replay leaves norms alone.

    Args:
        function: a module, a bound method of one, or a plain function (a plain
            function's norms, if it runs any, are not known and not protected).
        *args: its positional arguments.
        **kwargs: its keyword arguments (``use_reentrant`` is accepted and ignored:
            the checkpointing is always non-reentrant).

    Returns:
        What ``function`` returns.
    """
    kwargs.pop("use_reentrant", None)
    return _run_checkpointed(function, _modules_of([function]), *args, **kwargs)


def checkpoint_seq(
    functions: nn.Sequential | Iterable[Any],
    x: torch.Tensor,
    every: int = 1,
    flatten: bool = False,
    skip_last: bool = False,
) -> torch.Tensor:
    """Run ``functions`` in order on ``x``, checkpointing segments of ``every`` of them.

    timm's ``checkpoint_seq`` signature, with :func:`checkpoint`'s replay.

    Args:
        functions: an ``nn.Sequential`` or an iterable of modules / callables.
        x: the input of the first.
        every: functions per checkpointed segment.
        flatten: ``functions`` is a sequence of sequences (e.g. stages of blocks).
        skip_last: run the last segment without checkpointing.

    Returns:
        The output of the last function.
    """
    items: Iterable[Any] = (
        functions.children() if isinstance(functions, nn.Sequential) else functions
    )
    if flatten:
        items = chain.from_iterable(items)
    fns = list(items)
    end = len(fns) - (1 if skip_last else 0)

    def segment(part: list[Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(y: torch.Tensor) -> torch.Tensor:
            for f in part:
                y = f(y)
            return y

        return run

    for start in range(0, end, every):
        part = fns[start : min(start + every, end)]
        x = _run_checkpointed(segment(part), _modules_of(part), x)
    for f in fns[end:]:
        x = f(x)
    return x
