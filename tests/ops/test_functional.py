"""Shift ops, convolution as shift-and-sum, the conv path: against F.conv2d and hand cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from acmix import ops as AF
from acmix.ops import choose_backend
from tests.conftest import max_abs


def _fused(qkv: torch.Tensor, stride: int = 1) -> bool:
    """Whether the conv path runs the C++ kernel on these head features."""
    return choose_backend("conv_path", (qkv,), "auto", stride=stride) == "cpp"


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


def _assert_grads_match(out: torch.Tensor, ref: torch.Tensor, inputs: list) -> None:
    """Gradients of ``out`` and ``ref`` for one random cotangent agree to 1e-12 of the largest."""
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * g).sum(), inputs)
    grads = torch.autograd.grad((out * g).sum(), inputs)
    for a, b in zip(grads, grads_ref, strict=True):
        assert max_abs(a, b) < 1e-12 * b.abs().max().item()


def _conv_path_pytorch(qkv, fc_w, fc_b, dep_w, k, c_out, stride):
    """The unfused conv path: einsum fc, then the grouped conv (the fused kernel's truth)."""
    feats = AF.conv_path_features(qkv, fc_w, fc_b)
    return AF.shift_sum_group_conv(feats, dep_w, k, stride)


# (B, N, d, H, W, k, stride, outputs per group, fc bias)
FUSED_CASES = [
    (2, 4, 5, 9, 11, 3, 1, 4, False),
    (2, 2, 3, 8, 7, 3, 2, 4, True),
    (1, 3, 4, 13, 10, 5, 2, 2, True),
    (1, 2, 2, 5, 6, 3, 3, 8, True),
    (1, 1, 3, 7, 7, 3, 1, 1, False),
    (1, 4, 16, 19, 37, 3, 1, 4, False),  # several vectors per row, a partial last one
    (2, 8, 2, 4, 4, 3, 1, 9, True),  # M = 24: two fc tiles; 9 outputs: 8 + 1
]


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_conv_path_matches_pytorch_fwd_bwd(case) -> None:
    B, N, d, H, W, k, stride, per_group, bias = case
    c_out = per_group * d
    qkv = torch.randn(B, 3 * N, d, H, W, dtype=torch.float64, requires_grad=True)
    fc_w = torch.randn(k * k, 3 * N, dtype=torch.float64, requires_grad=True)
    fc_b = torch.randn(k * k, dtype=torch.float64, requires_grad=True) if bias else None
    dep_w = torch.randn(c_out, k * k, k, k, dtype=torch.float64, requires_grad=True)
    assert _fused(qkv)
    ref = _conv_path_pytorch(qkv, fc_w, fc_b, dep_w, k, c_out, stride)
    out = AF.conv_path(qkv, fc_w, fc_b, dep_w, k, c_out, stride, "learnable")
    assert out.shape == ref.shape == (B, c_out, -(-H // stride), -(-W // stride))
    assert max_abs(out, ref) < 1e-12 * ref.abs().max().item()
    inputs = [qkv, fc_w, dep_w] + ([fc_b] if bias else [])
    _assert_grads_match(out, ref, inputs)


def test_fused_conv_path_float32_and_fallbacks() -> None:
    B, N, d, H, W = 2, 4, 8, 14, 14
    qkv = torch.randn(B, 3 * N, d, H, W)
    fc_w, dep_w = torch.randn(9, 3 * N), torch.randn(N * d, 9, 3, 3)
    ref = _conv_path_pytorch(qkv.double(), fc_w.double(), None, dep_w.double(), 3, N * d, 1)
    out = AF.conv_path(qkv, fc_w, None, dep_w, 3, N * d)
    assert out.dtype == torch.float32
    scale = ref.abs().max().item()
    assert max_abs(out.double(), ref) < 1e-5 * scale
    # channels-last features (Swin's view): the channels-last kernel at stride 1;
    # other strides, other layouts and bf16 take the PyTorch path
    view = qkv.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    assert _fused(view)
    assert max_abs(AF.conv_path(view, fc_w, None, dep_w, 3, N * d).double(), ref) < 1e-5 * scale
    assert not _fused(view, 2)
    assert not _fused(qkv.transpose(3, 4))
    assert not _fused(qkv.bfloat16())
    with pytest.raises(ValueError, match=r"grouped-conv weight \(64, 9, 3, 3\) is not"):
        AF.conv_path(qkv, fc_w, None, dep_w.repeat(2, 1, 1, 1), 3, N * d)
    with pytest.raises(ValueError, match="does not map 12 head groups"):
        AF.conv_path(qkv, fc_w[:, :6], None, dep_w, 3, N * d)


# (B, N, d, H, W, k, outputs per group, fc bias): d a lane multiple or not, k = 1 / 3 / 5 / 7
CL_CASES = [
    (2, 3, 32, 14, 14, 3, 3, True),  # Swin-T's d = 32
    (1, 2, 5, 7, 9, 3, 2, False),
    (1, 4, 16, 5, 6, 5, 4, True),
    (2, 1, 3, 4, 4, 1, 1, True),
    (1, 2, 17, 6, 11, 3, 5, True),  # 5 outputs per group: a tile of 4 and one of 1
    (1, 2, 4, 3, 3, 7, 2, False),  # the window is larger than the map
    (1, 1, 8, 30, 3, 3, 7, False),  # several row blocks, a map narrower than a tile
]


@pytest.mark.parametrize("case", CL_CASES)
def test_channels_last_kernel_matches_pytorch_fwd_bwd(case) -> None:
    B, N, d, H, W, k, per_group, bias = case
    c_out = per_group * d
    f64 = torch.float64
    base = torch.randn(B, H, W, 3 * N, d, dtype=f64, requires_grad=True)
    qkv = base.permute(0, 3, 4, 1, 2)  # Swin's channels-last view of (B, 3N, d, H, W)
    fc_w = torch.randn(k * k, 3 * N, dtype=f64, requires_grad=True)
    fc_b = torch.randn(k * k, dtype=f64, requires_grad=True) if bias else None
    dep_w = torch.randn(c_out, k * k, k, k, dtype=f64, requires_grad=True)
    assert _fused(qkv)
    ref = _conv_path_pytorch(qkv, fc_w, fc_b, dep_w, k, c_out, 1)
    out = AF.conv_path(qkv, fc_w, fc_b, dep_w, k, c_out, 1, "learnable")
    assert out.shape == ref.shape == (B, c_out, H, W)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert max_abs(out, ref) < 1e-12 * ref.abs().max().item()
    inputs = [base, fc_w, dep_w] + ([fc_b] if bias else [])
    _assert_grads_match(out, ref, inputs)


@pytest.mark.parametrize("case", CL_CASES[:3])
def test_channels_last_kernel_float32(case) -> None:
    B, N, d, H, W, k, per_group, bias = case
    c_out = per_group * d
    base = torch.randn(B, H, W, 3 * N, d, requires_grad=True)
    qkv = base.permute(0, 3, 4, 1, 2)
    fc_w = torch.randn(k * k, 3 * N)
    fc_b = torch.randn(k * k) if bias else None
    dep_w = torch.randn(c_out, k * k, k, k)
    ref = _conv_path_pytorch(
        qkv.double(),
        fc_w.double(),
        None if fc_b is None else fc_b.double(),
        dep_w.double(),
        k,
        c_out,
        1,
    )
    out = AF.conv_path(qkv, fc_w, fc_b, dep_w, k, c_out, 1, "learnable")
    assert out.dtype == torch.float32
    assert max_abs(out.double(), ref) < 1e-5 * ref.abs().max().item()
    g = torch.randn_like(ref)
    (grad,) = torch.autograd.grad((out * g.float()).sum(), [base])
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), [base])
    assert max_abs(grad.double(), grad_ref) < 1e-5 * grad_ref.abs().max().item()


@pytest.mark.parametrize("bias", [False, True])
def test_conv_path_features_channels_last_view_equals_einsum(bias) -> None:
    B, N, d, H, W, K2 = 2, 3, 4, 5, 6, 9
    base = torch.randn(B, H, W, 3 * N, d, dtype=torch.float64, requires_grad=True)
    qkv = base.permute(0, 3, 4, 1, 2)  # Swin's channels-last view of (B, 3N, d, H, W)
    w = torch.randn(K2, 3 * N, dtype=torch.float64, requires_grad=True)
    b = torch.randn(K2, dtype=torch.float64, requires_grad=True) if bias else None
    out = AF.conv_path_features(qkv, w, b)
    expected = torch.einsum("bmdhw,km->bdkhw", qkv, w)
    if bias:
        expected = expected + b.view(1, 1, -1, 1, 1)
    expected = expected.reshape(B, d * K2, H, W)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert max_abs(out, expected) < 1e-12
    g = torch.randn_like(expected)
    inputs = [base, w] + ([b] if bias else [])
    for a, e in zip(
        torch.autograd.grad((out * g).sum(), inputs),
        torch.autograd.grad((expected * g).sum(), inputs),
        strict=True,
    ):
        assert max_abs(a, e) < 1e-12


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
