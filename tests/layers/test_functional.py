"""Shift ops, convolution as shift-and-sum, the conv path: against F.conv2d and hand cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from acmix.layers import functional as AF
from tests.conftest import max_abs


def test_shift2d_hand_case() -> None:
    x = torch.arange(9.0).view(1, 3, 3)
    # out[i, j] = x[i + 1, j - 1]
    out = AF.shift2d(x, 1, -1)
    expected = torch.tensor([[[0.0, 3.0, 4.0], [0.0, 6.0, 7.0], [0.0, 0.0, 0.0]]])
    assert torch.equal(out, expected)
    assert torch.equal(AF.shift2d(x, 0, 0), x)
    assert torch.equal(AF.shift2d(x, 3, 0), torch.zeros_like(x))


def test_kernel_offsets_row_major() -> None:
    assert AF.kernel_offsets(3) == [
        (-1, -1),
        (-1, 0),
        (-1, 1),
        (0, -1),
        (0, 0),
        (0, 1),
        (1, -1),
        (1, 0),
        (1, 1),
    ]
    assert AF.kernel_offsets(1) == [(0, 0)]


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
def test_conv2d_as_shift_sum_equals_conv2d(k: int, stride: int, hw: tuple[int, int]) -> None:
    """Eq. 1-3 of the paper: k x k conv = k^2 1x1 convs + shift + sum (forward and backward)."""
    x = torch.randn(2, 5, *hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    ours = AF.conv2d_as_shift_sum(x, w, b, stride)
    ref = F.conv2d(x, w, b, stride=stride, padding=k // 2)
    assert ours.shape == ref.shape == (2, 6, -(-hw[0] // stride), -(-hw[1] // stride))
    assert max_abs(ours, ref) < 1e-12
    g = torch.randn_like(ref)
    grads = torch.autograd.grad((ours * g).sum(), (x, w, b))
    grads_ref = torch.autograd.grad((ref * g).sum(), (x, w, b))
    for a, r in zip(grads, grads_ref, strict=True):
        assert max_abs(a, r) < 1e-11


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_shift_sum_tensor_equals_fixed_group_conv(k: int, stride: int) -> None:
    """Tensor shift and the grouped conv with one-hot kernels are the same operation."""
    G, rep = 3, 2
    x = torch.randn(2, G, k * k, 7, 10, dtype=torch.float64)
    t = AF.shift_sum(x, k, stride, repeat=rep)
    w = AF.shift_kernel(G * rep, k, dtype=torch.float64)
    g = AF.shift_sum_group_conv(x.reshape(2, G * k * k, 7, 10), w, k, stride)
    assert t.shape == g.shape
    assert max_abs(t, g) < 1e-13


def test_shift_sum_explicit_shifts() -> None:
    """shift_sum is the sum over positions p of shift2d by p's offset (stride 1)."""
    x = torch.randn(1, 2, 9, 5, 6, dtype=torch.float64)
    expected = sum(
        AF.shift2d(x[:, :, p], dy, dx) for p, (dy, dx) in enumerate(AF.kernel_offsets(3))
    )
    assert max_abs(AF.shift_sum(x, 3), expected) < 1e-13


def test_shift_kernel_is_one_hot() -> None:
    w = AF.shift_kernel(4, 3)
    assert w.shape == (4, 9, 3, 3)
    assert torch.equal(w.sum(dim=(2, 3)), torch.ones(4, 9))
    for p in range(9):
        assert w[0, p, p // 3, p % 3] == 1


def test_conv_path_layout_against_loops() -> None:
    """fc mixes the 3N head groups per (pixel, j); output channel o reads group j = o // N."""
    B, N, d, H, W, k = 1, 2, 3, 4, 5, 3
    qkv = torch.randn(B, 3 * N, d, H, W, dtype=torch.float64)
    fc_w = torch.randn(k * k, 3 * N, dtype=torch.float64)
    fc_b = torch.randn(k * k, dtype=torch.float64)
    out = AF.conv_path(qkv, fc_w, fc_b, None, k, N * d, shift_mode="tensor")
    feats = torch.einsum("km,bmdhw->bdkhw", fc_w, qkv) + fc_b.view(1, 1, -1, 1, 1)
    for o in range(N * d):
        j = o // N
        expected = sum(
            AF.shift2d(feats[:, j, p], dy, dx) for p, (dy, dx) in enumerate(AF.kernel_offsets(k))
        )
        assert max_abs(out[:, o], expected) < 1e-12


def test_position_grid() -> None:
    g = AF.position_grid(3, 4, dtype=torch.float64)
    assert g.shape == (1, 2, 3, 4)
    assert torch.equal(g[0, 0, 1], torch.linspace(-1, 1, 4, dtype=torch.float64))
    assert torch.equal(g[0, 1, :, 2], torch.linspace(-1, 1, 3, dtype=torch.float64))
    assert AF.position_grid(2, 2, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_shift_sum_rejects_bad_kernel() -> None:
    with pytest.raises(ValueError, match="odd"):
        AF.shift_kernel(4, 2)
    with pytest.raises(ValueError, match="kernel\\*\\*2"):
        AF.shift_sum(torch.randn(1, 1, 4, 3, 3), 3)
