"""The ACmix math as pure tensor functions.

Layouts are stated for every function. ``B`` batch, ``C`` channels, ``N``
heads, ``d = C / N`` head dimension, ``H x W`` input map, ``H' x W'`` output
map (``H' = ceil(H / stride)``), ``k`` a kernel size (always odd), ``K2 = k*k``
kernel positions in row-major order: position ``i`` has offset
``(i // k - k // 2, i % k - k // 2)``.

Stage I of both convolution and self-attention is a set of 1x1 projections;
stage II is cheap. This module holds the stage-II pieces shared by every
ACmix layer:

* shift ops and shift-and-sum in the paper's three forms (tensor shift,
  grouped convolution with fixed one-hot kernels, learnable grouped
  convolution initialised at the shift);
* a k x k convolution written as k*k 1x1 convolutions + shift + sum
  (the identity of the paper's Eq. 1-3, tested against ``F.conv2d``);
* the ACmix convolution path (fc over head groups, then shift-aggregation);
* the coordinate grid of the positional encoding, and the alpha/beta mix.

The attention path lives in :mod:`acmix.layers.attention`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from acmix.layers._cpp import CppConvPath, CppConvPathCL, conv_path_kernel
from acmix.utils.checks import check_odd_kernel, check_positive_int

ShiftMode = Literal["learnable", "fixed", "tensor"]
SHIFT_MODES: tuple[str, ...] = ("learnable", "fixed", "tensor")

__all__ = [
    "SHIFT_MODES",
    "acmix_mix",
    "conv2d_as_shift_sum",
    "conv_path",
    "conv_path_features",
    "kernel_offsets",
    "out_size",
    "position_grid",
    "shift2d",
    "shift_kernel",
    "shift_sum",
    "shift_sum_group_conv",
    "window_view",
]


def kernel_offsets(kernel: int, dilation: int = 1) -> list[tuple[int, int]]:
    """Offsets ``(dy, dx)`` of the ``kernel * kernel`` window positions, row-major.

    Position ``i`` has offset ``(i // kernel - kernel // 2, i % kernel - kernel // 2)``
    times ``dilation``.
    """
    r = kernel // 2
    return [(dilation * (i // kernel - r), dilation * (i % kernel - r)) for i in range(kernel**2)]


def shift2d(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift a map so that ``out[..., i, j] = x[..., i + dy, j + dx]`` (zeros outside).

    Args:
        x: ``(..., H, W)``.
        dy: row offset read by each output pixel (positive reads from below).
        dx: column offset read by each output pixel (positive reads from the right).

    Returns:
        ``(..., H, W)``, same dtype and device.
    """
    H, W = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, ye = max(0, -dy), min(H, H - dy)
    xs, xe = max(0, -dx), min(W, W - dx)
    if ys < ye and xs < xe:
        out[..., ys:ye, xs:xe] = x[..., ys + dy : ye + dy, xs + dx : xe + dx]
    return out


def out_size(size: int, stride: int) -> int:
    """``ceil(size / stride)``, written so that traced / ONNX graphs get it right.

    (``-(-a // b)`` is wrong in ONNX, whose integer division truncates.)
    """
    return (size + stride - 1) // stride


def window_view(
    x_pad: torch.Tensor, p: int, kernel: int, stride: int, out_hw: tuple[int, int]
) -> torch.Tensor:
    """View of a padded ``(..., Hp, Wp)`` map at window position ``p``.

    Rows ``p // kernel + stride * i`` and columns ``p % kernel + stride * j`` for an
    ``out_hw`` output: what every output pixel reads at that kernel position.
    """
    oy, ox = p // kernel, p % kernel
    Ho, Wo = out_hw
    return x_pad[
        ..., oy : oy + stride * (Ho - 1) + 1 : stride, ox : ox + stride * (Wo - 1) + 1 : stride
    ]


def shift_sum(x: torch.Tensor, kernel: int, stride: int = 1, repeat: int = 1) -> torch.Tensor:
    """Tensor-shift form of shift-and-sum: every position map moved to its offset and summed.

    ``out[b, g, i, j] = sum_p x[b, g, p, s*i + dy_p, s*j + dx_p]`` (zeros outside).
    With ``repeat > 1`` each output group is repeated ``repeat`` times along the
    channel axis (``out`` channel ``g * repeat + r``), which is what the
    fixed-kernel group convolution of the paper computes.

    Args:
        x: ``(B, G, K2, H, W)`` with ``K2 = kernel**2``.
        kernel: odd kernel size ``k``.
        stride: output stride ``s``.
        repeat: copies of each group in the output.

    Returns:
        ``(B, G * repeat, ceil(H / s), ceil(W / s))``.
    """
    kernel = check_odd_kernel("kernel", kernel)
    stride = check_positive_int("stride", stride)
    B, G, K2, H, W = x.shape
    if kernel * kernel != K2:
        raise ValueError(f"x has {K2} position maps, expected kernel**2 = {kernel * kernel}")
    r = kernel // 2
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    x_pad = F.pad(x, (r, r, r, r))
    out = x.new_zeros(B, G, Ho, Wo)
    for p in range(K2):
        out = out + window_view(x_pad[:, :, p], p, kernel, stride, (Ho, Wo))
    if repeat > 1:
        out = out.repeat_interleave(repeat, dim=1)
    return out


def shift_kernel(
    out_channels: int,
    kernel: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One-hot kernels that turn a grouped convolution into shift-and-sum.

    ``w[o, p, p // k, p % k] = 1``: in every group, input channel ``p`` is
    read at kernel position ``p``. Used by the grouped convolution of the
    ACmix convolution path (``groups = d``, ``K2`` input channels per group).

    Returns:
        ``(out_channels, k*k, k, k)``.
    """
    kernel = check_odd_kernel("kernel", kernel)
    K2 = kernel * kernel
    w = torch.zeros(out_channels, K2, kernel, kernel, dtype=dtype, device=device)
    idx = torch.arange(K2, device=device)
    w[:, idx, idx // kernel, idx % kernel] = 1
    return w


def shift_sum_group_conv(
    x: torch.Tensor, weight: torch.Tensor, kernel: int, stride: int = 1
) -> torch.Tensor:
    """Grouped-convolution form of shift-and-sum (fixed or learnable kernels).

    Args:
        x: ``(B, G * K2, H, W)``, channel ``g * K2 + p`` = position map ``p`` of group ``g``.
        weight: ``(C_out, K2, k, k)``; :func:`shift_kernel` gives the pure shift.
            ``C_out`` must be a multiple of ``G``; output channel ``o`` reads group
            ``o // (C_out / G)``.
        kernel: odd kernel size ``k``.
        stride: output stride.

    Returns:
        ``(B, C_out, ceil(H / s), ceil(W / s))``.
    """
    K2 = kernel * kernel
    groups = x.shape[1] // K2
    if x.device.type == "cpu":
        # oneDNN's grouped convolution is several times faster channels-last on CPU
        # (measured 6.5x for fwd+bwd at d=16, 9 maps per group, 56x56).
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight, None, stride=stride, padding=kernel // 2, groups=groups)


def conv2d_as_shift_sum(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
) -> torch.Tensor:
    """A k x k convolution (padding ``k // 2``) as k*k 1x1 convolutions + shift + sum.

    Stage I projects the input once per kernel position with the 1x1 kernel
    ``weight[:, :, p, q]``; stage II shifts each projection to its kernel
    position and sums. Equals ``F.conv2d(x, weight, bias, stride, k // 2)``.

    Args:
        x: ``(B, C_in, H, W)``.
        weight: ``(C_out, C_in, k, k)`` with odd ``k``.
        bias: ``(C_out,)`` or ``None``.
        stride: output stride.

    Returns:
        ``(B, C_out, ceil(H / s), ceil(W / s))``.
    """
    C_out, C_in, kh, kw = weight.shape
    if kh != kw:
        raise ValueError(f"weight must have a square kernel, got {kh}x{kw}")
    k = check_odd_kernel("kernel", kh)
    B, _, H, W = x.shape
    # Stage I: k*k independent 1x1 projections -> (B, C_out, K2, H, W).
    w1x1 = weight.permute(2, 3, 0, 1).reshape(k * k * C_out, C_in, 1, 1)
    proj = F.conv2d(x, w1x1).view(B, k * k, C_out, H, W).transpose(1, 2)
    # Stage II: shift to the kernel position and sum.
    out = shift_sum(proj, k, stride)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def conv_path_features(
    qkv: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The ACmix "light fully-connected layer": 3N head features -> K2 maps per channel.

    Mixes the ``3N`` head groups ``[q heads, k heads, v heads]`` at every
    pixel and within-head channel ``j`` into ``K2`` maps (the authors' 1x1
    ``fc`` over a ``(B, 3N, d, H*W)`` view).

    Args:
        qkv: ``(B, 3N, d, H, W)``: group ``which * N + head``, channel ``j``
            (any strides, e.g. a permuted channels-last view).
        fc_weight: ``(K2, 3N)`` (a ``(K2, 3N, 1, 1)`` conv weight is accepted).
        fc_bias: ``(K2,)`` or ``None``.

    Returns:
        ``(B, d * K2, H, W)``, channel ``j * K2 + p`` (the grouped-conv input layout);
        channels-last in memory when ``qkv`` is a channels-last view.
    """
    w = fc_weight.reshape(fc_weight.shape[0], -1)
    B, M, d, H, W = qkv.shape
    if w.shape[1] != M:
        raise ValueError(f"fc expects {w.shape[1]} head groups (3N), got {M}")
    w = w.to(qkv.dtype)
    K2 = w.shape[0]
    if qkv.permute(0, 3, 4, 1, 2).is_contiguous():
        # Channels-last features (Swin's (B, H, W, 3N, d) view): one GEMM over rows
        # (pixel, j) writes the grouped conv's channels-last input directly.
        rows = qkv.permute(0, 3, 4, 2, 1).reshape(B * H * W * d, M)
        bias = None if fc_bias is None else fc_bias.to(qkv.dtype)
        out = rows @ w.t() if bias is None else torch.addmm(bias, rows, w.t())
        return out.view(B, H, W, d * K2).permute(0, 3, 1, 2)
    out = torch.einsum("bmdhw,km->bdkhw", qkv, w)
    if fc_bias is not None:
        out = out + fc_bias.to(qkv.dtype).view(1, 1, -1, 1, 1)
    return out.reshape(B, d * K2, H, W)


def fused_conv_path_applies(qkv: torch.Tensor, stride: int = 1) -> bool:
    """Whether :func:`conv_path` runs a fused CPU kernel on these head features.

    It does for CPU float32/float64 features when the kernel builds
    (``ACMIX_NO_CPP=1`` disables it), outside tracing and compilation
    (exported graphs keep plain aten ops), and

    * contiguous ``(B, 3N, d, H, W)`` features, any stride; or
    * channels-last features (Swin's ``(B, H, W, 3N, d)`` view) at stride 1.

    Both kernels have a backward.

    The kernels do the PyTorch path's multiply-adds (fc einsum + grouped conv)
    in one pass, without materialising the ``K2 * d`` fc maps; the
    channels-last one also recomputes fc on the ``k // 2`` halo rows above and
    below each block of rows it works on.
    """
    if qkv.device.type != "cpu" or qkv.dtype not in (torch.float32, torch.float64):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    if not qkv.is_contiguous() and (stride != 1 or not qkv.permute(0, 3, 4, 1, 2).is_contiguous()):
        return False
    return conv_path_kernel() is not None


def conv_kernel_weights(
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    dep_weight: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The conv path's weights as the fused kernel takes them: contiguous, in ``dtype``.

    Returns:
        ``fc (K2, 3N)``, fc bias ``(K2,)`` or ``None``, grouped-conv weight ``(C_out, K2, k, k)``.
    """
    fc = fc_weight.reshape(fc_weight.shape[0], -1).to(dtype).contiguous()
    bias = None if fc_bias is None else fc_bias.to(dtype).contiguous()
    return fc, bias, dep_weight.to(dtype).contiguous()


def conv_path(
    qkv: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    dep_weight: torch.Tensor | None,
    kernel: int,
    out_channels: int,
    stride: int = 1,
    shift_mode: str = "learnable",
    use_kernel: bool = True,
) -> torch.Tensor:
    """The whole ACmix convolution path: fc, then shift-aggregation.

    Args:
        qkv: ``(B, 3N, d, H, W)`` head features (see :func:`conv_path_features`).
        fc_weight: ``(K2, 3N)``.
        fc_bias: ``(K2,)`` or ``None``.
        dep_weight: ``(C_out, K2, k, k)`` grouped-conv kernels for
            ``shift_mode`` ``"learnable"`` or ``"fixed"``; ignored for ``"tensor"``.
        kernel: odd conv-path kernel ``k``.
        out_channels: ``C_out`` (a multiple of ``d``).
        stride: output stride.
        shift_mode: ``"learnable"`` / ``"fixed"`` (grouped conv with ``dep_weight``)
            or ``"tensor"`` (explicit shift-and-sum, equal to ``"fixed"`` with
            :func:`shift_kernel`).
        use_kernel: run the grouped-conv modes through the fused CPU kernel
            where :func:`fused_conv_path_applies` (False: always PyTorch ops).

    Returns:
        ``(B, C_out, ceil(H / s), ceil(W / s))``; output channel ``o`` comes from
        within-head channel ``o // (C_out / d)``.

    The grouped-conv modes run as one fused CPU kernel where
    :func:`fused_conv_path_applies`; elsewhere as ``einsum`` + ``conv2d``.
    Channels-last features give a channels-last result (the same values).
    """
    B, M, d, H, W = qkv.shape
    if fc_weight.numel() != kernel * kernel * M:
        raise ValueError(
            f"fc weight {tuple(fc_weight.shape)} does not map {M} head groups (3N) to "
            f"{kernel * kernel} maps"
        )
    K2 = kernel * kernel
    if dep_weight is not None and tuple(dep_weight.shape) != (out_channels, K2, kernel, kernel):
        raise ValueError(
            f"grouped-conv weight {tuple(dep_weight.shape)} is not "
            f"{(out_channels, K2, kernel, kernel)} (C_out, k*k, k, k)"
        )
    fused = use_kernel and shift_mode != "tensor" and dep_weight is not None
    if fused and fused_conv_path_applies(qkv, stride):
        weights = conv_kernel_weights(fc_weight, fc_bias, dep_weight, qkv.dtype)
        if qkv.is_contiguous():
            return CppConvPath.apply(qkv.reshape(B, M * d, H, W), *weights, stride)
        # channels-last: (B, H, W, 3N * d) in, (B, H, W, C_out) out
        features = qkv.permute(0, 3, 4, 1, 2).reshape(B, H, W, M * d)
        return CppConvPathCL.apply(features, *weights).permute(0, 3, 1, 2)
    feats = conv_path_features(qkv, fc_weight, fc_bias)
    if shift_mode == "tensor":
        return shift_sum(feats.view(B, d, K2, H, W), kernel, stride, out_channels // d)
    if dep_weight is None:
        raise ValueError(f"shift_mode={shift_mode!r} needs the grouped-conv weight")
    return shift_sum_group_conv(feats, dep_weight.to(feats.dtype), kernel, stride)


def position_grid(
    height: int,
    width: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The 2-channel coordinate grid of ACmix's positional encoding.

    Channel 0 is ``x = linspace(-1, 1, W)`` varying along the width, channel 1
    is ``y = linspace(-1, 1, H)`` along the height. Built in the requested
    dtype and device (the authors' grid is always float32 on CUDA).

    Returns:
        ``(1, 2, H, W)``.
    """
    xs = torch.linspace(-1.0, 1.0, width, dtype=dtype, device=device)
    ys = torch.linspace(-1.0, 1.0, height, dtype=dtype, device=device)
    grid_x = xs.view(1, width).expand(height, width)
    grid_y = ys.view(height, 1).expand(height, width)
    return torch.stack((grid_x, grid_y), dim=0).unsqueeze(0)


def acmix_mix(
    att: torch.Tensor, conv: torch.Tensor, rate1: torch.Tensor, rate2: torch.Tensor
) -> torch.Tensor:
    """ACmix output ``alpha * F_att + beta * F_conv`` (``rate1``, ``rate2`` in the authors' code).

    Args:
        att: attention-path output, any layout.
        conv: convolution-path output, same shape as ``att``.
        rate1: alpha, a 1-element tensor.
        rate2: beta, a 1-element tensor.
    """
    return rate1.to(att.dtype) * att + rate2.to(conv.dtype) * conv
