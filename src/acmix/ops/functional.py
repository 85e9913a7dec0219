"""Tensor functions with a single implementation (no backend choice).

Layouts are stated per function; see :mod:`acmix.ops.api` for the notation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from acmix.ops.api import shift_sum
from acmix.utils.checks import check_odd_kernel

__all__ = ["acmix_mix", "conv2d_as_shift_sum", "position_grid", "shift2d"]


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


def conv2d_as_shift_sum(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
) -> torch.Tensor:
    """A k x k convolution (padding ``k // 2``) as k*k 1x1 convolutions + shift + sum.

    Stage I projects the input once per kernel position with the 1x1 kernel
    ``weight[:, :, p, q]``; stage II shifts each projection to its kernel
    position and sums (:func:`~acmix.ops.shift_sum`). Equals
    ``F.conv2d(x, weight, bias, stride, k // 2)``.

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


def _traceable_linspace(
    n: int, dtype: torch.dtype | None, device: torch.device | str | None
) -> torch.Tensor:
    """``linspace(-1, 1, n)`` from tensor ops only, finite for ``n = 1`` (``[-1]``).

    The ONNX export of ``torch.linspace`` computes its step as ``2 / (n - 1)``:
    infinite for a 1-pixel map, and ``0 * inf`` makes the whole output NaN
    (seen on ``acmix_tiny`` exported at 8x8). Here the divisor is the last index
    clamped to 1, a graph op, so a dynamic-size export stays valid at every size.
    """
    idx = torch.arange(n, dtype=dtype, device=device)
    return idx * 2.0 / idx[-1:].clamp(min=1.0) - 1.0


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
    if torch.jit.is_tracing():  # TorchScript / ONNX export, possibly with dynamic H x W
        xs = _traceable_linspace(width, dtype, device)
        ys = _traceable_linspace(height, dtype, device)
    else:
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
