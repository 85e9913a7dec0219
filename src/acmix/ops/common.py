"""Geometry shared by every op: output sizes, window views, padding, the border mask.

Layouts: ``k`` is an odd kernel (window) size, ``K2 = k * k`` window positions
in row-major order; position ``p`` has offset ``(p // k - k // 2, p % k - k // 2)``.
A padded map has ``k // 2`` extra pixels on every side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "acc_dtype",
    "kernel_offsets",
    "out_size",
    "pad_map",
    "window_mask_bias",
    "window_view",
]


def out_size(size: int, stride: int) -> int:
    """``ceil(size / stride)``, written so that traced / ONNX graphs get it right.

    (``-(-a // b)`` is wrong in ONNX, whose integer division truncates.)
    """
    return (size + stride - 1) // stride


def kernel_offsets(kernel: int, dilation: int = 1) -> list[tuple[int, int]]:
    """Offsets ``(dy, dx)`` of the ``kernel * kernel`` window positions, row-major.

    Position ``i`` has offset ``(i // kernel - kernel // 2, i % kernel - kernel // 2)``
    times ``dilation``.
    """
    r = kernel // 2
    return [(dilation * (i // kernel - r), dilation * (i % kernel - r)) for i in range(kernel**2)]


def pad_map(x: torch.Tensor, r: int, padding: str) -> torch.Tensor:
    """Pad the last two dims of ``(..., H, W)`` by ``r`` on every side.

    Args:
        x: a map with at least 3 dims (``F.pad``'s reflection needs a batch or channel dim).
        r: pixels added on each side.
        padding: ``"reflect"`` (mirror without repeating the edge) or ``"zeros"``.
    """
    if r == 0:
        return x
    return F.pad(x, (r, r, r, r), mode="reflect" if padding == "reflect" else "constant")


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


def window_mask_bias(
    H: int, W: int, kernel: int, stride: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive ``(K2, H', W')`` bias of masked zero padding: 0 inside the image, -inf outside."""
    r = kernel // 2
    ones = torch.ones(1, 1, H, W, dtype=dtype, device=device)
    valid = F.unfold(F.pad(ones, (r, r, r, r)), kernel, stride=stride)
    bias = torch.zeros_like(valid).masked_fill(valid == 0, float("-inf"))
    return bias.view(kernel * kernel, out_size(H, stride), out_size(W, stride))


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half / bfloat16, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def refuse_double_backward(op: str) -> None:
    """Raise where a hand-written backward is asked to build a graph (double backward).

    The fast backends' gradients are computed, not traced, so a second
    differentiation through them (``create_graph=True``: Hessian-vector
    products, gradient penalties) would miss terms. Call at the top of such a
    backward; the reference backend is differentiable to any order.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: double backward (create_graph=True) through a fast backend is not "
            "supported: its gradients are hand-written. Use backend='reference', which is "
            "differentiable to any order."
        )
