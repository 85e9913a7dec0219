"""The ``"shift"`` backend: shift-and-accumulate in pure PyTorch, hand-written backwards.

Loops over the ``k * k`` window positions with strided views of the padded
maps (:func:`~acmix.ops.common.window_view`), so no window tensor is ever
materialised; the backwards are shift-sums too and keep only the inputs (and,
for the attention, its weights). Any device, any dtype (half precision
accumulates the softmax in float32). Once differentiable: a double backward
raises and names the reference backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from acmix.ops.common import (
    acc_dtype,
    out_size,
    pad_map,
    refuse_double_backward,
    window_mask_bias,
    window_view,
)

__all__ = ["local_attention_shift", "patchwise_aggregate_shift", "shift_sum_shift", "unavailable"]


def unavailable(op: str, tensors: Sequence[torch.Tensor], facts: dict[str, Any]) -> str | None:
    """Pure PyTorch: runs everywhere."""
    return None


# ----------------------------------------------------------------------------------------
# Local attention
# ----------------------------------------------------------------------------------------


def _attention_forward(
    q: torch.Tensor,
    k_pad: torch.Tensor,
    v_pad: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: int,
    stride: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on scaled queries ``(BN, d, H', W')`` and padded keys / values ``(BN, d, Hp, Wp)``.

    ``bias`` is the ``(K2, H', W')`` mask or ``None``.

    Returns:
        ``out (BN, d, H', W')`` and the attention weights ``(BN, K2, H', W')``.
    """
    BN, d, Ho, Wo = q.shape
    K2 = kernel * kernel
    logits = q.new_empty(BN, K2, Ho, Wo)
    for p in range(K2):
        logits[:, p] = (q * window_view(k_pad, p, kernel, stride, (Ho, Wo))).sum(1)
    if bias is not None:
        logits = logits + bias
    attn = torch.softmax(logits, dim=1, dtype=acc_dtype(q.dtype)).to(q.dtype)
    out = torch.zeros_like(q)
    for p in range(K2):
        out.addcmul_(attn[:, p : p + 1], window_view(v_pad, p, kernel, stride, (Ho, Wo)))
    return out, attn


class _ShiftAttention(torch.autograd.Function):
    """Local dot-product attention by shift-and-accumulate, with a hand-written backward."""

    @staticmethod
    def forward(ctx, q, k_pad, v_pad, bias, kernel: int, stride: int):  # type: ignore[override]
        out, attn = _attention_forward(q, k_pad, v_pad, bias, kernel, stride)
        ctx.save_for_backward(q, k_pad, v_pad, attn)
        ctx.kernel, ctx.stride = kernel, stride
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        refuse_double_backward("local_attention (shift)")
        q, k_pad, v_pad, attn = ctx.saved_tensors
        kernel, stride = ctx.kernel, ctx.stride
        BN, d, Ho, Wo = q.shape
        K2 = kernel * kernel
        grad_out = grad_out.contiguous()
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        grad_q = grad_k = grad_v = None
        if need_v:
            grad_v = torch.zeros_like(v_pad)
            for p in range(K2):
                window_view(grad_v, p, kernel, stride, (Ho, Wo)).addcmul_(
                    attn[:, p : p + 1], grad_out
                )
        if need_q or need_k:
            grad_attn = torch.empty_like(attn)
            for p in range(K2):
                view = window_view(v_pad, p, kernel, stride, (Ho, Wo))
                grad_attn[:, p] = (grad_out * view).sum(1)
            # Softmax backward: dlogit = a * (da - sum(a * da)).
            grad_logits = attn * (grad_attn - (attn * grad_attn).sum(1, keepdim=True))
            if need_q:
                grad_q = torch.zeros_like(q)
                for p in range(K2):
                    view = window_view(k_pad, p, kernel, stride, (Ho, Wo))
                    grad_q.addcmul_(grad_logits[:, p : p + 1], view)
            if need_k:
                grad_k = torch.zeros_like(k_pad)
                for p in range(K2):
                    window_view(grad_k, p, kernel, stride, (Ho, Wo)).addcmul_(
                        grad_logits[:, p : p + 1], q
                    )
        return grad_q, grad_k, grad_v, None, None, None


def _attention_mlp(
    q_c: torch.Tensor,
    k_pad: torch.Tensor,
    v_pad: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: int,
    stride: int,
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    pe_c: torch.Tensor | None,
) -> torch.Tensor:
    """MLP-weighted local attention by shift-and-accumulate (autograd through views).

    ``W1 [q; key] = W1q q + W1k key``: both halves are projected once, on the
    query map and on the padded key map, and only the ReLU and the final
    ``w2`` dot run per window offset.
    """
    w1, b1, w2 = mlp
    BN, d, Ho, Wo = q_c.shape
    K2 = kernel * kernel
    w1q, w1k = w1[:, :d], w1[:, d:]
    a = torch.einsum("bchw,oc->bohw", q_c, w1q) + b1.view(1, -1, 1, 1)
    if pe_c is not None:
        a = a + torch.einsum("bchw,oc->bohw", pe_c, w1k)
    bk = torch.einsum("bchw,oc->bohw", k_pad, w1k)
    logits = torch.stack(
        [
            torch.einsum(
                "bohw,o->bhw", torch.relu(a + window_view(bk, p, kernel, stride, (Ho, Wo))), w2
            )
            for p in range(K2)
        ],
        dim=1,
    )
    if bias is not None:
        logits = logits + bias
    attn = torch.softmax(logits, dim=1)
    out = torch.zeros_like(q_c)
    for p in range(K2):
        out = out + attn[:, p : p + 1] * window_view(v_pad, p, kernel, stride, (Ho, Wo))
    return out


def local_attention_shift(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: int,
    stride: int,
    padding: str,
    pe: torch.Tensor | None,
    scale: float | None,
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Local attention by shift-and-accumulate (arguments: :func:`acmix.ops.local_attention`).

    Uses that ``q_c . pe_c`` is constant over the window (it cancels in the
    softmax): the keys become ``k - pe``, formed once.
    """
    B, N, d, H, W = q.shape
    r = kernel // 2
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    q_c = q[..., ::stride, ::stride].reshape(B * N, d, Ho, Wo)
    keys = k if pe is None else k - pe.reshape(1, 1, d, H, W).to(q.dtype)
    k_pad = pad_map(keys.reshape(B * N, d, H, W), r, padding)
    v_pad = pad_map(v.reshape(B * N, d, H, W), r, padding)
    bias = None
    if padding == "zeros" and r > 0:
        bias = window_mask_bias(H, W, kernel, stride, q.dtype, q.device)
    if mlp is not None:
        pe_c = None
        if pe is not None:
            pe_c = pe.reshape(1, d, H, W)[..., ::stride, ::stride].to(q.dtype)
        out = _attention_mlp(q_c, k_pad, v_pad, bias, kernel, stride, mlp, pe_c)
    else:
        q_c = q_c * (d**-0.5 if scale is None else scale)
        if torch.is_grad_enabled() and (
            q_c.requires_grad or k_pad.requires_grad or v_pad.requires_grad
        ):
            out = _ShiftAttention.apply(q_c, k_pad, v_pad, bias, kernel, stride)
        else:
            out, _ = _attention_forward(q_c, k_pad, v_pad, bias, kernel, stride)
    return out.view(B, N, d, Ho, Wo)


# ----------------------------------------------------------------------------------------
# Patchwise aggregation (SAN)
# ----------------------------------------------------------------------------------------


class _ShiftAggregate(torch.autograd.Function):
    """Patchwise aggregation by shift-and-accumulate over the ``k*k`` window positions.

    Forward and backward each loop over the window positions with strided
    views of the padded map; only the padded values and the weights are saved.
    """

    @staticmethod
    def forward(ctx: Any, x_pad: torch.Tensor, weight: torch.Tensor, kernel: int) -> torch.Tensor:
        # x_pad: (B, C, H + 2r, W + 2r); weight: (B, G, K2, H, W) -> out (B, C, H, W)
        B, C, Hp, Wp = x_pad.shape
        G, H, W = weight.shape[1], weight.shape[3], weight.shape[4]
        xv = x_pad.reshape(B, C // G, G, Hp, Wp)  # channel c = s * G + g
        out_dtype = torch.promote_types(x_pad.dtype, weight.dtype)
        # Half-precision inputs accumulate in float32 (k*k terms per output).
        out = x_pad.new_zeros(B, C // G, G, H, W, dtype=acc_dtype(out_dtype))
        for p in range(kernel * kernel):
            out.addcmul_(window_view(xv, p, kernel, 1, (H, W)), weight[:, None, :, p])
        ctx.save_for_backward(x_pad, weight)
        ctx.kernel = kernel
        return out.view(B, C, H, W).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        refuse_double_backward("patchwise_aggregate (shift)")
        x_pad, weight = ctx.saved_tensors
        kernel = ctx.kernel
        B, C, Hp, Wp = x_pad.shape
        G, H, W = weight.shape[1], weight.shape[3], weight.shape[4]
        g = grad_out.reshape(B, C // G, G, H, W)
        xv = x_pad.reshape(B, C // G, G, Hp, Wp)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            # d out / d x_pad: scatter g * w back to every window position.
            acc = x_pad.new_zeros(B, C // G, G, Hp, Wp, dtype=acc_dtype(x_pad.dtype))
            for p in range(kernel * kernel):
                window_view(acc, p, kernel, 1, (H, W)).addcmul_(g, weight[:, None, :, p])
            grad_x = acc.view(B, C, Hp, Wp).to(x_pad.dtype)
        if ctx.needs_input_grad[1]:
            # d out / d w[g, p]: sum over the channels sharing weight channel g.
            grad_w = torch.empty_like(weight)
            dt = acc_dtype(weight.dtype)
            for p in range(kernel * kernel):
                grad_w[:, :, p] = (g.to(dt) * window_view(xv, p, kernel, 1, (H, W))).sum(1)
        return grad_x, grad_w, None


def patchwise_aggregate_shift(
    x: torch.Tensor, weight: torch.Tensor, kernel: int, padding: str
) -> torch.Tensor:
    """Patchwise aggregation by shift-and-accumulate (see :func:`acmix.ops.patchwise_aggregate`)."""
    return _ShiftAggregate.apply(pad_map(x, kernel // 2, padding), weight, kernel)


# ----------------------------------------------------------------------------------------
# Shift-and-sum
# ----------------------------------------------------------------------------------------


def shift_sum_shift(x: torch.Tensor, kernel: int, stride: int = 1, repeat: int = 1) -> torch.Tensor:
    """Tensor-shift form of shift-and-sum. Layouts as :func:`acmix.ops.shift_sum`."""
    B, G, K2, H, W = x.shape
    r = kernel // 2
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    x_pad = pad_map(x, r, "zeros")
    out = x.new_zeros(B, G, Ho, Wo)
    for p in range(K2):
        out = out + window_view(x_pad[:, :, p], p, kernel, stride, (Ho, Wo))
    if repeat > 1:
        out = out.repeat_interleave(repeat, dim=1)
    return out
