"""Peak memory of a region: on CPU counted at PyTorch's allocator, on CUDA from its statistics.

CPU PyTorch keeps no allocator statistics, but its profiler records every
allocation and free made through the CPU allocator (``profile_memory=True``).
:func:`peak_memory` replays those records in time order and returns the
largest rise above the level at the start: "peak extra memory", the same
quantity ``torch.cuda.max_memory_allocated`` gives on a GPU.

Counting at the allocator (rather than the tensors an op returns) matters:
oneDNN reorders its inputs and outputs into temporary buffers inside a single
op, and fused extension kernels create their outputs outside the dispatcher;
a count of the storages ops return sees neither. Memory that does not come
from PyTorch's allocator (e.g. a kernel's own thread-local scratch, reused
across calls) is not counted.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

__all__ = ["peak_memory"]


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> int:
    """Peak bytes allocated on ``device`` by ``fn()`` above the level at its start.

    ``fn``'s result is freed inside the measured region, so what it returns
    counts only while it is alive. Call ``fn`` once beforehand where it has
    lazy one-time work (e.g. building a kernel) that should not be counted.

    Args:
        fn: the region to measure; called once.
        device: a CUDA device reads the caching allocator's peak statistics;
            any other is measured at PyTorch's CPU allocator, as above.

    Returns:
        The peak in bytes.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        del result
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    # Kineto prints start/stop lines to stderr on every session unless told not to.
    saved = os.environ.get("KINETO_LOG_LEVEL")
    os.environ["KINETO_LOG_LEVEL"] = saved if saved is not None else "6"
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
            del result
    finally:
        if saved is None:
            del os.environ["KINETO_LOG_LEVEL"]
    kineto = getattr(prof.profiler, "kineto_results", None)
    if kineto is None:  # pragma: no cover - every PyTorch build since 1.9 has it
        raise RuntimeError("peak_memory needs PyTorch's Kineto profiler results")
    records = sorted(
        (e.start_ns(), e.nbytes())
        for e in kineto.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return peak
