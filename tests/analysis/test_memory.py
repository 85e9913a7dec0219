"""Peak memory at the allocator: hand-computed cases, extension kernels included."""

from __future__ import annotations

import pytest
import torch

from acmix.analysis.memory import peak_memory
from acmix.ops.cpp import kernel


def test_peak_memory_counts_new_storages() -> None:
    x = torch.randn(1000)

    def fn():
        a = x * 2  # 4000 bytes
        b = a + 1  # 4000 bytes, both alive
        del a
        c = b.view(10, 100)  # a view: no new storage
        return c.sum()

    peak = peak_memory(fn)
    assert 8000 <= peak <= 8000 + 64


def test_peak_memory_is_the_largest_rise() -> None:
    def fn():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        del a  # freed: the 2 MiB below reuse the level, they do not add to 1 MiB
        return torch.empty(2 << 20, dtype=torch.uint8)

    assert peak_memory(fn) == 2 << 20


def test_peak_memory_sees_allocations_outside_the_dispatcher() -> None:
    """A C++ extension's outputs (made by at::empty inside the kernel) count too."""
    ext = kernel("attention")
    if ext is None:
        pytest.skip("the C++ attention kernel is not available here")
    B, N, d, H = 2, 2, 4, 9
    qkv = torch.randn(B, 3 * N * d, H, H)

    def fn():
        out, lse = ext.forward(qkv, None, N, 3, False, 0.5, 1)
        return out.numel() * 4 + lse.numel() * 4

    fn()
    expected = (B * N * d * H * H + B * N * H * H) * 4
    assert peak_memory(fn) >= expected
