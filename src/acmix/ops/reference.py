"""The ``"reference"`` backend: every op written plainly, the truth others are tested against.

Obviously correct rather than fast: the local attention and the patchwise
aggregation unfold their windows (``k * k`` times the activation memory), the
window attention forms its softmax explicitly, the convolution path is the
authors' ``fc`` + grouped convolution, and shift-and-sum is a grouped
convolution with one-hot kernels. Pure PyTorch: any device, any dtype,
differentiable to any order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from acmix.ops.common import out_size, pad_map, window_mask_bias
from acmix.utils.checks import check_odd_kernel

__all__ = [
    "conv_path_features",
    "conv_path_reference",
    "local_attention_reference",
    "patchwise_aggregate_reference",
    "shift_kernel",
    "shift_sum_group_conv",
    "shift_sum_reference",
    "unavailable",
    "window_attention_reference",
]


def unavailable(op: str, tensors: Sequence[torch.Tensor], facts: dict[str, Any]) -> str | None:
    """The reference runs everywhere."""
    return None


def _unfold_windows(x: torch.Tensor, kernel: int, stride: int, padding: str) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, K2, H', W')`` windows of the padded map."""
    B, C, H, W = x.shape
    cols = F.unfold(pad_map(x, kernel // 2, padding), kernel, stride=stride)
    return cols.view(B, C, kernel * kernel, out_size(H, stride), out_size(W, stride))


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: int,
    stride: int = 1,
    padding: str = "reflect",
    pe: torch.Tensor | None = None,
    scale: float | None = None,
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Local attention exactly as the authors compute it (unfolded windows).

    Args:
        q, k, v: ``(B, N, d, H, W)``.
        kernel: odd window size ``k``.
        stride: query stride.
        padding: ``"reflect"`` or ``"zeros"`` (masked).
        pe: positional encoding ``(1, d, H, W)`` / ``(d, H, W)`` or ``None``.
        scale: query scale for the dot product; default ``d ** -0.5``.
        mlp: ``(w1 (h, 2d), b1 (h,), w2 (h,))`` for the MLP weighting, else ``None``.

    Returns:
        ``(B, N, d, H', W')``.
    """
    B, N, d, H, W = q.shape
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    K2 = kernel * kernel
    q_c = q[..., ::stride, ::stride].unsqueeze(3)  # (B, N, d, 1, H', W')
    k_u = _unfold_windows(k.reshape(B * N, d, H, W), kernel, stride, padding)
    v_u = _unfold_windows(v.reshape(B * N, d, H, W), kernel, stride, padding)
    keys = k_u.view(B, N, d, K2, Ho, Wo)
    if pe is not None:
        pe = pe.reshape(1, d, H, W).to(q.dtype)
        pe_u = _unfold_windows(pe, kernel, stride, padding).view(1, 1, d, K2, Ho, Wo)
        pe_c = pe[..., ::stride, ::stride].view(1, 1, d, 1, Ho, Wo)
        keys = keys + pe_c - pe_u
    if mlp is None:
        s = d**-0.5 if scale is None else scale
        logits = ((q_c * s) * keys).sum(2)  # (B, N, K2, H', W')
    else:
        w1, b1, w2 = mlp
        feat = torch.cat((q_c.expand_as(keys), keys), dim=2)  # (B, N, 2d, K2, H', W')
        hidden = torch.relu(
            torch.einsum("bnckhw,oc->bnokhw", feat, w1) + b1.view(1, 1, -1, 1, 1, 1)
        )
        logits = torch.einsum("bnokhw,o->bnkhw", hidden, w2)
    if padding == "zeros":
        logits = logits + window_mask_bias(H, W, kernel, stride, logits.dtype, logits.device)
    attn = torch.softmax(logits, dim=2)
    return (attn.unsqueeze(2) * v_u.view(B, N, d, K2, Ho, Wo)).sum(3)


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


def shift_kernel(
    out_channels: int,
    kernel: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One-hot kernels that turn a grouped convolution into shift-and-sum.

    ``w[o, p, p // k, p % k] = 1``: in every group, input channel ``p`` is
    read at kernel position ``p``.

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
    groups = x.shape[1] // (kernel * kernel)
    if x.device.type == "cpu":
        # oneDNN's grouped convolution is several times faster channels-last on CPU
        # (measured 6.5x for fwd+bwd at d=16, 9 maps per group, 56x56).
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, weight.to(x.dtype), None, stride=stride, padding=kernel // 2, groups=groups)


def conv_path_reference(
    qkv: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    dep_weight: torch.Tensor,
    kernel: int,
    stride: int = 1,
) -> torch.Tensor:
    """The authors' convolution path: ``fc`` (1x1 over head groups), then the grouped conv.

    Args:
        qkv: ``(B, 3N, d, H, W)`` head features.
        fc_weight: ``(K2, 3N)``; fc_bias ``(K2,)`` or ``None``.
        dep_weight: ``(C_out, K2, k, k)`` grouped-conv kernels.
        kernel: odd conv-path kernel ``k``.
        stride: output stride.

    Returns:
        ``(B, C_out, ceil(H / s), ceil(W / s))``.
    """
    feats = conv_path_features(qkv, fc_weight, fc_bias)
    return shift_sum_group_conv(feats, dep_weight, kernel, stride)


def shift_sum_reference(
    x: torch.Tensor, kernel: int, stride: int = 1, repeat: int = 1
) -> torch.Tensor:
    """Shift-and-sum as a grouped convolution with one-hot kernels (:func:`acmix.ops.shift_sum`)."""
    B, G, K2, H, W = x.shape
    weight = shift_kernel(G * repeat, kernel, dtype=x.dtype, device=x.device)
    out = F.conv2d(x.reshape(B, G * K2, H, W), weight, None, stride, kernel // 2, groups=G)
    return out


def window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Window attention, softmax written out (layouts: :func:`acmix.ops.window_attention`)."""
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = torch.softmax(attn, dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p)
    return attn @ v


def patchwise_aggregate_reference(
    x: torch.Tensor, weight: torch.Tensor, kernel: int, padding: str = "reflect"
) -> torch.Tensor:
    """SAN's aggregation by ``unfold`` (layouts: :func:`acmix.ops.patchwise_aggregate`)."""
    B, C, H, W = x.shape
    G, K2 = weight.shape[1], kernel * kernel
    cols = F.unfold(pad_map(x, kernel // 2, padding), kernel)  # (B, C*K2, H*W), channel c*K2 + p
    cols = cols.view(B, C // G, G, K2, H, W)
    return (weight.unsqueeze(1) * cols).sum(3).reshape(B, C, H, W)
