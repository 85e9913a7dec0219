"""The MAC counter: hand counts, reference vs fast path, analytic formulas."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from acmix.analysis import count_macs, count_params
from acmix.layers import ACmix, WindowACmix


def test_conv_hand_count() -> None:
    conv = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    assert count_macs(conv, (1, 4, 5, 5)).total == 8 * 4 * 9 * 25
    assert count_params(conv) == 8 * 4 * 9


def acmix_analytic(C_in: int, C: int, H: int, W: int, N: int, ka: int, kc: int, s: int) -> int:
    """DESIGN.md section 1 table, per image: stage I + attention + FC + group conv + pos-enc."""
    d = C // N
    Ho, Wo = -(-H // s), -(-W // s)
    stage1 = 3 * C * C_in * H * W
    pos = 2 * d * H * W  # conv_p on the 2-channel grid
    attn = 2 * ka * ka * C * Ho * Wo
    fc = 3 * N * kc * kc * d * H * W
    group_conv = kc**4 * d * (C // d) * Ho * Wo  # k^4 * C * H'W'
    return stage1 + pos + attn + fc + group_conv


@pytest.mark.parametrize(
    ("C_in", "C", "H", "W", "N", "ka", "kc", "s"),
    [(16, 16, 14, 14, 4, 7, 3, 1), (8, 16, 9, 11, 2, 5, 3, 2), (32, 32, 7, 7, 4, 3, 5, 1)],
)
def test_acmix_counted_equals_analytic(C_in, C, H, W, N, ka, kc, s) -> None:
    m = ACmix(C_in, C, ka, N, kc, s, padding_mode="auto")
    expected = acmix_analytic(C_in, C, H, W, N, ka, kc, s)
    for backend in ("shift", "reference"):
        m.backend = backend
        assert count_macs(m, (1, C_in, H, W)).total == expected, backend
    # Batch scales linearly, except the positional encoding (computed once per call).
    pos = 2 * (C // N) * H * W
    assert count_macs(m, (3, C_in, H, W)).total == 3 * (expected - pos) + pos


def test_tensor_shift_conv_path_counted() -> None:
    m = ACmix(16, 16, shift_mode="tensor")
    learn = ACmix(16, 16)
    H = 10
    diff = count_macs(learn, (1, 16, H, H)).total - count_macs(m, (1, 16, H, H)).total
    # group conv k^4 C HW replaced by k^2 C HW shifted adds
    assert diff == 81 * 16 * H * H - 9 * 16 * H * H


def test_window_acmix_counted() -> None:
    C, N, ws, H = 32, 2, 7, 14
    m = WindowACmix(C, ws, N)
    L = ws * ws
    nW = (H // ws) ** 2
    qkv = 3 * C * C * H * H
    attn = nW * N * 2 * L * L * (C // N)
    proj = C * C * H * H
    fc = 3 * N * 9 * (C // N) * H * H
    group = 81 * C * H * H
    for backend in ("sdpa", "reference"):
        m.backend = backend
        got = count_macs(m, torch.randn(1, H, H, C)).total
        assert got == qkv + attn + proj + fc + group, backend


def test_by_module_is_hierarchical() -> None:
    net = nn.Sequential(nn.Conv2d(16, 16, 1), ACmix(16, 16))
    r = count_macs(net, (1, 16, 14, 14))
    assert r.by_module[""] == r.total == r.by_module["0"] + r.by_module["1"]
    assert r.by_module["0"] == 16 * 16 * 196
