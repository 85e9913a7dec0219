"""Local (sliding-window) self-attention: the attention path of spatial ACmix.

Every query pixel ``c`` attends, per head, over the ``k x k`` neighbourhood
of its position (the window of the paper's Eq. 4):

    logit(c, n) = (q_c * scale) . (k_n + pe_c - pe_n)
    out_c       = sum_n softmax_n(logit(c, n)) v_n

with ``pe`` a positional encoding of ``d`` channels shared by all heads.
Two padding semantics at the image border:

* ``"reflect"`` (the authors'): keys and values come from the
  reflection-padded map, so a border key can appear twice in a window and
  then counts twice in the softmax;
* ``"zeros"`` (masked): out-of-image window positions are excluded from the
  softmax.

Queries are taken at every ``stride``-th pixel starting at 0, so the output is
``ceil(H / stride) x ceil(W / stride)`` for any ``H x W``.

Backends, all computing the same function:

* ``"reference"``: the authors' algorithm, written plainly: unfold keys and
  values into ``(B, N, d, k*k, H', W')`` windows. Obviously correct, ``k*k``
  times the activation memory. Kept as the truth for tests.
* ``"shift"``: shift-and-accumulate over the ``k*k`` window offsets with
  strided views of the padded maps, never materialising windows, with a
  hand-written backward (whose gradients are themselves shift-sums). Pure
  PyTorch: any device and dtype.
* ``"cpp"``: the same algorithm fused into one C++ kernel per direction
  (``src/acmix/csrc``): per head plane, padded key / value planes and
  contiguous inner loops over blocks of rows with the logits in cache; it
  keeps only the log-sum-exp for backward and recomputes the weights there.
  Stride ``s`` takes every ``s``-th query of the stride-1 result. CPU,
  float32 / float64, dot-product weighting; compiled on first use.
* ``"auto"`` picks ``"cpp"`` where it applies and builds, else ``"shift"``.

The fast backends use that ``q_c . pe_c`` is constant over the window and
cancels in the softmax, so ``k - pe`` is formed once.

The generalised attention weights of the paper's Sec. 4.5 are available as
``weight="mlp"``: ``logit(c, n) = w2 . relu(W1 [q_c ; k_n + pe_c - pe_n] + b1)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from acmix.layers._cpp import CppLocalAttention, cpu_kernel
from acmix.layers.functional import out_size, window_view
from acmix.utils.checks import check_choice, check_odd_kernel, check_positive_int

Backend = Literal["auto", "cpp", "shift", "reference"]
BACKENDS: tuple[str, ...] = ("auto", "cpp", "shift", "reference")
ATTN_WEIGHTS: tuple[str, ...] = ("dot", "mlp")

__all__ = [
    "ATTN_WEIGHTS",
    "BACKENDS",
    "local_attention",
    "local_attention_qkv",
    "local_attention_reference",
]


def _pad(x: torch.Tensor, r: int, padding: str) -> torch.Tensor:
    if r == 0:
        return x
    return F.pad(x, (r, r, r, r), mode="reflect" if padding == "reflect" else "constant")


def _window_mask_bias(
    H: int, W: int, kernel: int, stride: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive ``(K2, H', W')`` bias: 0 for in-image window positions, -inf outside."""
    r = kernel // 2
    ones = torch.ones(1, 1, H, W, dtype=dtype, device=device)
    valid = F.unfold(F.pad(ones, (r, r, r, r)), kernel, stride=stride)
    bias = torch.zeros_like(valid).masked_fill(valid == 0, float("-inf"))
    return bias.view(kernel * kernel, out_size(H, stride), out_size(W, stride))


# --------------------------------------------------------------------------
# Reference backend: the authors' unfold algorithm.
# --------------------------------------------------------------------------


def _unfold_windows(x: torch.Tensor, kernel: int, stride: int, padding: str) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, K2, H', W')`` windows of the padded map."""
    B, C, H, W = x.shape
    cols = F.unfold(_pad(x, kernel // 2, padding), kernel, stride=stride)
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
        bias = _window_mask_bias(H, W, kernel, stride, logits.dtype, logits.device)
        logits = logits + bias
    attn = torch.softmax(logits, dim=2)
    return (attn.unsqueeze(2) * v_u.view(B, N, d, K2, Ho, Wo)).sum(3)


# --------------------------------------------------------------------------
# Shift backend: shift-and-accumulate, custom backward.
# --------------------------------------------------------------------------


def _shift_attention_forward(
    q: torch.Tensor,
    k_pad: torch.Tensor,
    v_pad: torch.Tensor,
    bias: torch.Tensor | None,
    kernel: int,
    stride: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward of the shift backend.

    Args:
        q: scaled queries ``(BN, d, H', W')``.
        k_pad, v_pad: padded keys (positional term included) and values ``(BN, d, Hp, Wp)``.
        bias: ``(K2, H', W')`` additive mask or ``None``.

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
    if q.dtype in (torch.float16, torch.bfloat16):
        attn = torch.softmax(logits, dim=1, dtype=torch.float32).to(q.dtype)
    else:
        attn = torch.softmax(logits, dim=1)
    out = torch.zeros_like(q)
    for p in range(K2):
        out.addcmul_(attn[:, p : p + 1], window_view(v_pad, p, kernel, stride, (Ho, Wo)))
    return out, attn


class _ShiftAttention(torch.autograd.Function):
    """Local dot-product attention by shift-and-accumulate, with a hand-written backward."""

    @staticmethod
    def forward(ctx, q, k_pad, v_pad, bias, kernel: int, stride: int):  # type: ignore[override]
        out, attn = _shift_attention_forward(q, k_pad, v_pad, bias, kernel, stride)
        ctx.save_for_backward(q, k_pad, v_pad, attn)
        ctx.kernel, ctx.stride = kernel, stride
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
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
                grad_attn[:, p] = (grad_out * window_view(v_pad, p, kernel, stride, (Ho, Wo))).sum(
                    1
                )
            # Softmax backward: dlogit = a * (da - sum(a * da)).
            grad_logits = attn * (grad_attn - (attn * grad_attn).sum(1, keepdim=True))
            if need_q:
                grad_q = torch.zeros_like(q)
                for p in range(K2):
                    grad_q.addcmul_(
                        grad_logits[:, p : p + 1], window_view(k_pad, p, kernel, stride, (Ho, Wo))
                    )
            if need_k:
                grad_k = torch.zeros_like(k_pad)
                for p in range(K2):
                    window_view(grad_k, p, kernel, stride, (Ho, Wo)).addcmul_(
                        grad_logits[:, p : p + 1], q
                    )
        return grad_q, grad_k, grad_v, None, None, None


def _shift_attention_mlp(
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


def _cpp_attention(
    qkv: torch.Tensor,
    heads: int,
    kernel: int,
    stride: int,
    padding: str,
    pe: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:
    """The fused CPU kernel on ``qkv (B, 3C, H, W)``: returns ``(B, C, H', W')``."""
    B, C3, H, W = qkv.shape
    d = C3 // (3 * heads)
    pe_c = None if pe is None else pe.reshape(d, H, W).to(qkv.dtype).contiguous()
    s = d**-0.5 if scale is None else scale
    return CppLocalAttention.apply(
        qkv.contiguous(), pe_c, heads, kernel, padding == "zeros", float(s), stride
    )


def local_attention_qkv(
    qkv: torch.Tensor,
    heads: int,
    kernel: int,
    stride: int = 1,
    padding: str = "reflect",
    pe: torch.Tensor | None = None,
    scale: float | None = None,
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`local_attention` on a fused projection, without splitting it where possible.

    Args:
        qkv: ``(B, 3C, H, W)``, channel ``which * C + head * d + j``.
        heads: number of heads ``N``.
        kernel, stride, padding, pe, scale, mlp, backend: as :func:`local_attention`.

    Returns:
        ``(B, C, H', W')``.
    """
    B, C3, H, W = qkv.shape
    if C3 % (3 * heads):
        raise ValueError(f"qkv has {C3} channels, not a multiple of 3 * heads = {3 * heads}")
    d = C3 // (3 * heads)
    kernel, stride = _check_window_args(kernel, stride, padding, backend, H, W)
    if mlp is None and cpu_kernel_applies(backend, qkv):
        return _cpp_attention(qkv, heads, kernel, stride, padding, pe, scale)
    q, k, v = qkv.view(B, 3, heads, d, H, W).unbind(1)
    out = local_attention(q, k, v, kernel, stride, padding, pe, scale, mlp, backend)
    return out.reshape(B, heads * d, out.shape[-2], out.shape[-1])


def _check_window_args(
    kernel: int, stride: int, padding: str, backend: str, H: int, W: int
) -> tuple[int, int]:
    """Validate the arguments shared by both entry points; returns ``(kernel, stride)``."""
    kernel = check_odd_kernel("kernel", kernel)
    stride = check_positive_int("stride", stride)
    check_choice("padding", padding, ("reflect", "zeros"))
    check_choice("backend", backend, BACKENDS)
    if padding == "reflect" and (kernel // 2 >= H or kernel // 2 >= W):
        raise ValueError(
            f"the {H}x{W} map is too small for reflection padding of a {kernel}x{kernel} "
            f"window; use padding='zeros' (masked)"
        )
    return kernel, stride


def cpu_kernel_applies(backend: str, q: torch.Tensor) -> bool:
    applies = q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64)
    if backend == "cpp":
        if not applies:
            raise ValueError(
                f"backend='cpp' needs CPU float32/float64 tensors, got {q.dtype} on {q.device}"
            )
        if cpu_kernel() is None:
            raise RuntimeError("backend='cpp' requested but the CPU kernel could not be built")
        return True
    if backend != "auto" or not applies:
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False  # keep traced / exported graphs in plain aten ops
    return cpu_kernel() is not None


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: int,
    stride: int = 1,
    padding: str = "reflect",
    pe: torch.Tensor | None = None,
    scale: float | None = None,
    mlp: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Local window attention with the authors' semantics (see the module docstring).

    Args:
        q, k, v: ``(B, N, d, H, W)`` queries, keys and values (``q`` unscaled).
        kernel: odd window size ``k``.
        stride: query stride ``s``; the output is ``ceil(H/s) x ceil(W/s)``.
        padding: ``"reflect"`` (authors') or ``"zeros"`` (out-of-image keys
            masked). Reflection needs ``k // 2 < H`` and ``< W``.
        pe: positional encoding ``(1, d, H, W)`` or ``(d, H, W)`` shared by all
            heads and batch items, or ``None``.
        scale: query scale of the dot product; default ``d ** -0.5``.
        mlp: ``(w1 (h, 2d), b1 (h,), w2 (h,))`` for the Sec. 4.5 MLP weighting;
            ``None`` for the dot product.
        backend: ``"auto"``, ``"cpp"``, ``"shift"`` or ``"reference"`` (see the module
            docstring); ``"cpp"`` raises where the kernel does not apply.

    Returns:
        ``(B, N, d, H', W')``.
    """
    if q.dim() != 5 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            "q, k, v must all be (B, N, d, H, W) of one shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, N, d, H, W = q.shape
    kernel, stride = _check_window_args(kernel, stride, padding, backend, H, W)
    r = kernel // 2
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    if backend == "reference":
        return local_attention_reference(q, k, v, kernel, stride, padding, pe, scale, mlp)

    if mlp is None and cpu_kernel_applies(backend, q):
        qkv = torch.cat((q, k, v), dim=1).reshape(B, 3 * N * d, H, W)
        out = _cpp_attention(qkv, N, kernel, stride, padding, pe, scale)
        return out.view(B, N, d, out.shape[-2], out.shape[-1])
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    q_c = q[..., ::stride, ::stride].reshape(B * N, d, Ho, Wo)
    keys = k if pe is None else k - pe.reshape(1, 1, d, H, W).to(q.dtype)
    k_pad = _pad(keys.reshape(B * N, d, H, W), r, padding)
    v_pad = _pad(v.reshape(B * N, d, H, W), r, padding)
    bias = None
    if padding == "zeros" and r > 0:
        bias = _window_mask_bias(H, W, kernel, stride, q.dtype, q.device)

    if mlp is not None:
        pe_c = None
        if pe is not None:
            pe_c = pe.reshape(1, d, H, W)[..., ::stride, ::stride].to(q.dtype)
        out = _shift_attention_mlp(q_c, k_pad, v_pad, bias, kernel, stride, mlp, pe_c)
    else:
        q_c = q_c * (d**-0.5 if scale is None else scale)
        if torch.is_grad_enabled() and (
            q_c.requires_grad or k_pad.requires_grad or v_pad.requires_grad
        ):
            out = _ShiftAttention.apply(q_c, k_pad, v_pad, bias, kernel, stride)
        else:
            out, _ = _shift_attention_forward(q_c, k_pad, v_pad, bias, kernel, stride)
    return out.view(B, N, d, Ho, Wo)
