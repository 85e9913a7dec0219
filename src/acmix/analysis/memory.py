"""Peak tensor memory of a region, on any device (CPU included).

CPU PyTorch keeps no allocator statistics, so :class:`TensorMemoryTracker`
counts storages itself: a dispatch mode sees every op's outputs, adds the
bytes of each new storage, and a ``weakref.finalize`` subtracts them when the
storage dies. The peak is the largest total of live storages created inside
the region ("peak extra memory": inputs and parameters that existed before
are not counted). Views and in-place results share storages and count once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorMemoryTracker", "peak_memory"]


class TensorMemoryTracker(TorchDispatchMode):
    """Track live bytes of storages created while the mode is active.

    Attributes:
        current: bytes of storages created in the region and still alive.
        peak: the maximum of ``current``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        for t in flat:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in self._seen:
                continue
            nbytes = storage.nbytes()
            self._seen.add(key)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key, nbytes)
        return out


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensors allocated by ``fn()`` (results freed before returning count too)."""
    tracker = TensorMemoryTracker()
    with tracker:
        result = fn()
    del result
    return tracker.peak
