"""The ``"triton"`` backend: the local attention as Triton kernels, registered torch ops.

Two ``torch.library`` custom ops in the ``acmix`` namespace, each with a fake
implementation and a FLOP formula, the forward with its autograd:

=========================================  ==========================================
op                                         computes
=========================================  ==========================================
``acmix::local_attention_triton``          ``(out, lse)`` of prepared q, padded k, v
``acmix::local_attention_triton_backward`` ``(dq, dk_pad, dv_pad)``
=========================================  ==========================================

The ops take prepared tensors (``BN = B * N``, all contiguous, head dimension
innermost): scaled queries at the strided pixels ``(BN, H', W', d)`` and the
padded keys (``k - pe``) and values ``(BN, H + k - 1, W + k - 1, d)``.
:func:`local_attention_triton` does that preparation in PyTorch, so autograd
gives ``pe`` its gradient (``q . pe_c`` is constant over a window and cancels
in the softmax, so only ``-pe`` at the keys remains) and folds the padded
border's gradients back onto their pixels (the adjoint of ``F.pad``). Reflect
padding duplicates border keys physically, so they count twice as in the
reference; zero padding masks the padded keys out of the softmax.

Kernels (:mod:`acmix.ops.triton_kernels`): each program takes a 4 x 4 tile of
queries of one (batch, head) against the key box its windows cover, in blocks
of 64 keys, with ``tl.dot`` for the logits and the weighted sum and an online
softmax accumulated in float32; only the log-sum-exp is kept. The backward is
FlashAttention's: a query-centric kernel recomputes ``P`` from the log-sum-exp,
writes ``D = rowsum(dO * O)`` and ``dq``; a key-centric kernel gathers ``dk``
and ``dv`` for a 4 x 4 tile of padded keys from the query box that reaches it
(deterministic, no atomics). float32 inputs use ``tl.dot``'s IEEE precision
unless ``torch.backends.cuda.matmul.allow_tf32`` is set.

Only the attention has a Triton kernel. On CUDA, ``acmix_stage2`` composes it
with the reference convolution path (cuDNN's grouped convolution and the fc
einsum): a fused Triton conv path was not written because without a GPU it
cannot be measured against cuDNN. Neither kernel's GPU speed has been measured;
their correctness is tested under Triton's interpreter (``TRITON_INTERPRET=1``,
CPU tensors), which this backend accepts as a device.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from acmix.ops.common import out_size, pad_map, refuse_double_backward

try:
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    from acmix.ops import triton_kernels as _kernels

    # TRITON_INTERPRET=1 is read when the kernels are defined (at import), not at launch.
    _INTERPRETED = isinstance(_kernels.attention_fwd, InterpretedFunction)
except ImportError:  # Triton is optional: the backend then says it is unavailable
    triton = None
    _kernels = None  # type: ignore[assignment]
    _INTERPRETED = False

__all__ = [
    "interpreted",
    "local_attention_triton",
    "local_attention_triton_backward_op",
    "local_attention_triton_op",
    "unavailable",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Query (forward, dq) or key (dk, dv) tile of one program, and keys / queries per block.
_TILE = 4
_BLOCK = 64


def interpreted() -> bool:
    """Whether the kernels were defined under Triton's interpreter (they then run on CPU)."""
    return _INTERPRETED


@torch.compiler.assume_constant_result
def _cuda_reason(index: int) -> str:
    """Why device ``cuda:index`` cannot run the kernels (``""``: it can); a constant to dynamo."""
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < (8, 0):
        name = torch.cuda.get_device_name(index)
        return f"needs a GPU of compute capability >= 8.0, got {name} ({major}.{minor})"
    return ""


def unavailable(op: str, tensors: Sequence[Tensor], facts: dict[str, Any]) -> str | None:
    """Why the Triton kernels cannot run ``op`` on these tensors (``None``: they can)."""
    if op != "local_attention":
        return f"no Triton kernel for {op}"
    if facts.get("weight", "dot") != "dot":
        return f"dot-product attention weights only, got {facts['weight']!r}"
    if torch.jit.is_tracing():
        return "torch.jit tracing keeps graphs in plain aten ops (ONNX export)"
    if _kernels is None:
        return "Triton is not installed"
    t = tensors[0]
    if t.device.type == "cuda":
        why = _cuda_reason(t.device.index if t.device.index is not None else 0)
        if why:
            return why
    elif t.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got cpu"
        if not interpreted():
            return "TRITON_INTERPRET=1 was set after acmix defined its kernels; set it before"
    else:
        return f"needs CUDA tensors, got {t.device.type}"
    if t.dtype == torch.float64:
        return "float64 is not supported; use cpp/shift/reference"
    if t.dtype not in _DTYPES:
        return f"needs float32 / float16 / bfloat16, got {t.dtype}"
    return None


# ----------------------------------------------------------------------------------------
# Launches
# ----------------------------------------------------------------------------------------


def _block_d(d: int) -> int:
    """The head dimension as the kernels see it: the next power of two, at least 16."""
    return max(16, 1 << (d - 1).bit_length())


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: TF32 for float32 only where torch allows it for matmuls.

    (It matters for float32 operands only; 16-bit operands always use the tensor cores.)
    """
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@contextlib.contextmanager
def _on_device(t: Tensor) -> Iterator[None]:
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    if t.is_cuda:
        with torch.cuda.device(t.device):
            yield
    else:
        yield


def _check_prepared(q: Tensor, k_pad: Tensor, v_pad: Tensor, kernel: int, H: int, W: int) -> None:
    if q.dim() != 4 or k_pad.dim() != 4 or v_pad.shape != k_pad.shape:
        raise ValueError(
            "expected q (BN, H', W', d) and k_pad, v_pad (BN, H+k-1, W+k-1, d), got "
            f"{tuple(q.shape)}, {tuple(k_pad.shape)}, {tuple(v_pad.shape)}"
        )
    BN, _, _, d = q.shape
    if tuple(k_pad.shape) != (BN, H + kernel - 1, W + kernel - 1, d):
        raise ValueError(
            f"k_pad {tuple(k_pad.shape)} is not (BN={BN}, H+k-1={H + kernel - 1}, "
            f"W+k-1={W + kernel - 1}, d={d})"
        )


def _geometry(q: Tensor, k_pad: Tensor, kernel: int, stride: int, H: int, W: int) -> dict:
    """The scalar and constexpr launch arguments shared by the three kernels."""
    BN, Ho, Wo, d = q.shape
    _, Hp, Wp, _ = k_pad.shape
    if (Ho, Wo) != (out_size(H, stride), out_size(W, stride)):
        raise ValueError(f"q is {Ho}x{Wo}, not ceil(({H}, {W}) / {stride})")
    return {
        "H": H,
        "W": W,
        "Ho": Ho,
        "Wo": Wo,
        "Hp": Hp,
        "Wp": Wp,
        "d": d,
        "KERNEL": kernel,
        "STRIDE": stride,
        "TH": _TILE,
        "TW": _TILE,
        "BLOCK": _BLOCK,
        "BLOCK_D": _block_d(d),
        "PRECISION": _precision(q.dtype),
    }


def _query_launch(g: dict, BN: int) -> tuple[tuple[int], dict]:
    """Grid and tiling of the query-centric kernels: the key box of a query tile."""
    n_ty, n_tx = triton.cdiv(g["Ho"], _TILE), triton.cdiv(g["Wo"], _TILE)
    box_h = box_w = g["STRIDE"] * (_TILE - 1) + g["KERNEL"]
    tiling = {"n_tx": n_tx, "tiles": n_ty * n_tx, "box_w": box_w, "box_n": box_h * box_w}
    return (BN * n_ty * n_tx,), tiling


def _key_launch(g: dict, BN: int) -> tuple[tuple[int], dict]:
    """Grid and tiling of the key-centric kernel: the query box of a padded-key tile."""
    n_ty, n_tx = triton.cdiv(g["Hp"], _TILE), triton.cdiv(g["Wp"], _TILE)
    box_h = box_w = (_TILE + g["KERNEL"] - 2) // g["STRIDE"] + 1
    tiling = {"n_tx": n_tx, "tiles": n_ty * n_tx, "box_w": box_w, "box_n": box_h * box_w}
    return (BN * n_ty * n_tx,), tiling


# ----------------------------------------------------------------------------------------
# Registered ops
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("acmix::local_attention_triton", mutates_args=())
def local_attention_triton_op(
    q: Tensor, k_pad: Tensor, v_pad: Tensor, kernel: int, stride: int, zeros: bool, H: int, W: int
) -> tuple[Tensor, Tensor]:
    """Local attention of prepared tensors.

    Args:
        q: scaled queries at the strided pixels, ``(BN, H', W', d)``.
        k_pad, v_pad: padded keys (``k - pe``) and values, ``(BN, H + k - 1, W + k - 1, d)``.
        kernel: odd window ``k``.
        stride: query stride ``s``.
        zeros: mask the padded keys out (zero padding) instead of using them (reflect).
        H, W: the unpadded map.

    Returns:
        ``out (BN, H', W', d)`` in ``q``'s dtype and the float32 log-sum-exp ``(BN, H', W')``.
    """
    _check_prepared(q, k_pad, v_pad, kernel, H, W)
    q, k_pad, v_pad = q.contiguous(), k_pad.contiguous(), v_pad.contiguous()
    g = _geometry(q, k_pad, kernel, stride, H, W)
    BN, Ho, Wo, _ = q.shape
    out = torch.empty_like(q)
    lse = q.new_empty(BN, Ho, Wo, dtype=torch.float32)
    if q.numel():
        grid, tiling = _query_launch(g, BN)
        with _on_device(q):
            _kernels.attention_fwd[grid](q, k_pad, v_pad, out, lse, ZEROS=zeros, **g, **tiling)
    return out, lse


@local_attention_triton_op.register_fake
def _(q, k_pad, v_pad, kernel, stride, zeros, H, W):
    BN, Ho, Wo, _ = q.shape
    return torch.empty_like(q), q.new_empty(BN, Ho, Wo, dtype=torch.float32)


@torch.library.custom_op("acmix::local_attention_triton_backward", mutates_args=())
def local_attention_triton_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k_pad: Tensor,
    v_pad: Tensor,
    out: Tensor,
    lse: Tensor,
    kernel: int,
    stride: int,
    zeros: bool,
    H: int,
    W: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk_pad, dv_pad)`` of :func:`local_attention_triton_op`.

    ``grad_out`` and ``out`` are ``(BN, H', W', d)``, ``lse`` the forward's.
    The gradients have their inputs' shapes and dtypes (accumulated in float32).
    """
    _check_prepared(q, k_pad, v_pad, kernel, H, W)
    q, k_pad, v_pad = q.contiguous(), k_pad.contiguous(), v_pad.contiguous()
    grad_out, out, lse = grad_out.contiguous().to(q.dtype), out.contiguous(), lse.contiguous()
    g = _geometry(q, k_pad, kernel, stride, H, W)
    BN = q.shape[0]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k_pad), torch.empty_like(v_pad)
    if q.numel():
        delta = torch.empty_like(lse)
        grid, tiling = _query_launch(g, BN)
        with _on_device(q):
            _kernels.attention_bwd_dq[grid](
                q, k_pad, v_pad, out, grad_out, lse, delta, dq, ZEROS=zeros, **g, **tiling
            )
            grid, tiling = _key_launch(g, BN)
            _kernels.attention_bwd_dkdv[grid](
                q, k_pad, v_pad, grad_out, lse, delta, dk, dv, ZEROS=zeros, **g, **tiling
            )
    else:
        dk.zero_()
        dv.zero_()
    return dq, dk, dv


@local_attention_triton_backward_op.register_fake
def _(grad_out, q, k_pad, v_pad, out, lse, kernel, stride, zeros, H, W):
    return torch.empty_like(q), torch.empty_like(k_pad), torch.empty_like(v_pad)


def _setup(ctx, inputs, output):
    q, k_pad, v_pad, *args = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k_pad, v_pad, out, lse)
    ctx.args = args


def _backward(ctx, grad_out, _grad_lse):
    refuse_double_backward("local_attention (triton)")
    q, k_pad, v_pad, out, lse = ctx.saved_tensors
    dq, dk, dv = local_attention_triton_backward_op(grad_out, q, k_pad, v_pad, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


local_attention_triton_op.register_autograd(_backward, setup_context=_setup)


def _macs(q: Sequence[int], kernel: int) -> int:
    """``2 k^2 d`` multiply-adds per head and query (the logits and the weighted sum)."""
    BN, Ho, Wo, d = q
    return 2 * kernel * kernel * d * BN * Ho * Wo


@register_flop_formula(torch.ops.acmix.local_attention_triton)
def _(q, k_pad, v_pad, kernel, stride, zeros, H, W, *args, **kwargs) -> int:
    return 2 * _macs(q, kernel)


@register_flop_formula(torch.ops.acmix.local_attention_triton_backward)
def _(grad_out, q, k_pad, v_pad, out, lse, kernel, stride, zeros, H, W, *args, **kwargs) -> int:
    return 4 * _macs(q, kernel)


# ----------------------------------------------------------------------------------------
# Front end
# ----------------------------------------------------------------------------------------


def local_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel: int,
    stride: int,
    padding: str,
    pe: Tensor | None,
    scale: float | None,
) -> Tensor:
    """Local dot-product attention by the Triton kernels (as :func:`acmix.ops.local_attention`).

    Args:
        q, k, v: ``(B, N, d, H, W)``, one dtype (float32, float16 or bfloat16).
        kernel: odd window ``k``.
        stride: query stride.
        padding: ``"reflect"`` or ``"zeros"`` (masked).
        pe: ``(1, d, H, W)`` / ``(d, H, W)`` or ``None``.
        scale: query scale; default ``d ** -0.5``.

    Returns:
        ``(B, N, d, H', W')``, contiguous.
    """
    B, N, d, H, W = q.shape
    r = kernel // 2
    Ho, Wo = out_size(H, stride), out_size(W, stride)
    s = d**-0.5 if scale is None else scale
    q_c = (q[..., ::stride, ::stride] * s).permute(0, 1, 3, 4, 2).reshape(B * N, Ho, Wo, d)
    keys = k if pe is None else k - pe.reshape(1, 1, d, H, W).to(q.dtype)

    def prepare(x: Tensor) -> Tensor:
        padded = pad_map(x.reshape(B * N, d, H, W), r, padding)
        return padded.permute(0, 2, 3, 1).contiguous()

    out, _ = local_attention_triton_op(
        q_c.contiguous(), prepare(keys), prepare(v), kernel, stride, padding == "zeros", H, W
    )
    return out.view(B, N, Ho, Wo, d).permute(0, 1, 4, 2, 3).contiguous()
