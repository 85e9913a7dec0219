"""Wall-clock timing of a callable: the one timer of the cost tables and the benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

__all__ = ["sync_device", "time_fn"]


def sync_device(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA); a no-op on the CPU.

    Args:
        device: the device whose queue to drain.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], object],
    device: torch.device,
    *,
    warmup: int = 2,
    min_reps: int = 3,
    min_time: float = 0.5,
) -> float:
    """Median seconds per call of ``fn`` (at least ``min_reps`` calls and ``min_time`` s).

    Args:
        fn: the work to time (called with no arguments).
        device: where ``fn`` runs; CUDA work is synchronised around each call.
        warmup: untimed calls first.
        min_reps: at least this many timed calls.
        min_time: and at least this many seconds of them (at most 50 calls).

    Returns:
        The median of the timed calls, in seconds.
    """
    for _ in range(warmup):
        fn()
    sync_device(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return statistics.median(times)
