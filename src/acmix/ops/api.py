"""The ops' front ends: validate once, :func:`~acmix.ops.backends.choose_backend`, run.

Layouts: ``B`` batch, ``C`` channels, ``N`` heads, ``d = C / N`` head
dimension, ``H x W`` input map, ``H' x W'`` output map (``ceil(H / stride)``),
``k`` an odd kernel, ``K2 = k * k`` window positions, row-major.
"""

from __future__ import annotations

import torch

from acmix.ops import cpp, reference, sdpa, shift, triton_backend
from acmix.ops.backends import BACKENDS, choose_backend
from acmix.ops.common import out_size
from acmix.ops.counting import note_macs
from acmix.utils.checks import check_choice, check_odd_kernel, check_positive_int

__all__ = [
    "ATTN_WEIGHTS",
    "SHIFT_MODES",
    "acmix_stage2",
    "conv_path",
    "local_attention",
    "local_attention_qkv",
    "patchwise_aggregate",
    "shift_sum",
    "window_attention",
]

ATTN_WEIGHTS: tuple[str, ...] = ("dot", "mlp")
SHIFT_MODES: tuple[str, ...] = ("learnable", "fixed", "tensor")

Mlp = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------------------
# Local attention
# ----------------------------------------------------------------------------------------


def _check_window_args(
    kernel: int, stride: int, padding: str, backend: str, H: int, W: int
) -> tuple[int, int]:
    """Validate the arguments shared by the local-attention entry points."""
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


def _check_qkv(qkv: torch.Tensor, heads: int) -> int:
    """Check a fused projection ``(B, 3C, H, W)`` against ``heads``; returns ``d = C / heads``."""
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be (B, 3C, H, W), got shape {tuple(qkv.shape)}")
    check_positive_int("heads", heads)
    if qkv.shape[1] % (3 * heads):
        raise ValueError(
            f"qkv has {qkv.shape[1]} channels, not a multiple of 3 * heads = {3 * heads}"
        )
    return qkv.shape[1] // (3 * heads)


def _note_attention_macs(
    anchor: torch.Tensor, B: int, N: int, d: int, Ho: int, Wo: int, kernel: int, mlp: Mlp | None
) -> None:
    """Elementwise attention work: ``2 k^2 d`` per head and output pixel.

    (The MLP weighting adds its last layer, ``k^2 h`` per head and pixel.)
    """
    K2 = kernel * kernel
    macs = 2 * K2 * B * N * d * Ho * Wo
    if mlp is not None:
        macs += K2 * mlp[0].shape[0] * B * N * Ho * Wo
    note_macs(anchor, macs)


def _cpp_attention_args(
    qkv: torch.Tensor, heads: int, pe: torch.Tensor | None, scale: float | None
) -> tuple[torch.Tensor | None, float]:
    B, C3, H, W = qkv.shape
    d = C3 // (3 * heads)
    pe_c = None if pe is None else pe.reshape(d, H, W).to(qkv.dtype).contiguous()
    return pe_c, float(d**-0.5 if scale is None else scale)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: int,
    stride: int = 1,
    padding: str = "reflect",
    pe: torch.Tensor | None = None,
    scale: float | None = None,
    mlp: Mlp | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Local window attention with the authors' semantics.

    Every query pixel ``c`` attends, per head, over the ``k x k`` neighbourhood
    of its position: ``logit(c, n) = (q_c * scale) . (k_n + pe_c - pe_n)``,
    ``out_c = sum_n softmax_n(logit) v_n``. With ``padding="reflect"`` keys come
    from the reflection-padded map (a border key can appear twice and then
    counts twice); ``"zeros"`` masks out-of-image positions out of the softmax.

    Args:
        q, k, v: ``(B, N, d, H, W)`` queries, keys and values (``q`` unscaled).
        kernel: odd window size ``k``.
        stride: query stride ``s``; queries at every ``s``-th pixel from 0, the
            output is ``ceil(H/s) x ceil(W/s)``.
        padding: ``"reflect"`` (needs ``k // 2 < H, W``) or ``"zeros"``.
        pe: positional encoding ``(1, d, H, W)`` or ``(d, H, W)`` shared by all
            heads and batch items, or ``None``.
        scale: query scale of the dot product; default ``d ** -0.5``.
        mlp: ``(w1 (h, 2d), b1 (h,), w2 (h,))`` for the Sec. 4.5 MLP weighting
            ``logit = w2 . relu(W1 [q_c ; k_n + pe_c - pe_n] + b1)``; ``None`` for the dot product.
        backend: one of :data:`~acmix.ops.BACKENDS` (implemented: ``"cpp"``,
            ``"triton"`` (CUDA), ``"shift"``, ``"reference"``).

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
    k, v = k.to(q.dtype), v.to(q.dtype)
    weight = "dot" if mlp is None else "mlp"
    name = choose_backend("local_attention", (q, k, v), backend, weight=weight)
    if name == "cpp":
        qkv = torch.cat((q, k, v), dim=1).reshape(B, 3 * N * d, H, W)
        pe_c, s = _cpp_attention_args(qkv, N, pe, scale)
        out, _ = cpp.local_attention_cpu(qkv, pe_c, N, kernel, padding == "zeros", s, stride)
        return out.view(B, N, d, out.shape[-2], out.shape[-1])
    return _split_local_attention(name, q, k, v, kernel, stride, padding, pe, scale, mlp)


def _split_local_attention(
    name: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: int,
    stride: int,
    padding: str,
    pe: torch.Tensor | None,
    scale: float | None,
    mlp: Mlp | None,
) -> torch.Tensor:
    """Run the chosen backend ``name`` (not ``"cpp"``) on validated ``(B, N, d, H, W)`` inputs."""
    if name == "triton":  # (its registered op's FLOP formula counts it)
        return triton_backend.local_attention_triton(q, k, v, kernel, stride, padding, pe, scale)
    B, N, d, H, W = q.shape
    _note_attention_macs(q, B, N, d, out_size(H, stride), out_size(W, stride), kernel, mlp)
    if name == "reference":
        return reference.local_attention_reference(q, k, v, kernel, stride, padding, pe, scale, mlp)
    return shift.local_attention_shift(q, k, v, kernel, stride, padding, pe, scale, mlp)


def local_attention_qkv(
    qkv: torch.Tensor,
    heads: int,
    kernel: int,
    stride: int = 1,
    padding: str = "reflect",
    pe: torch.Tensor | None = None,
    scale: float | None = None,
    mlp: Mlp | None = None,
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
    d = _check_qkv(qkv, heads)
    kernel, stride = _check_window_args(kernel, stride, padding, backend, H, W)
    weight = "dot" if mlp is None else "mlp"
    name = choose_backend("local_attention", (qkv,), backend, weight=weight)
    if name == "cpp":
        pe_c, s = _cpp_attention_args(qkv, heads, pe, scale)
        out, _ = cpp.local_attention_cpu(qkv, pe_c, heads, kernel, padding == "zeros", s, stride)
        return out
    # The other backends take the heads split; validated and chosen once, here.
    q, k, v = qkv.view(B, 3, heads, d, H, W).unbind(1)
    out = _split_local_attention(name, q, k, v, kernel, stride, padding, pe, scale, mlp)
    return out.reshape(B, heads * d, out.shape[-2], out.shape[-1])


# ----------------------------------------------------------------------------------------
# Convolution path, shift-and-sum
# ----------------------------------------------------------------------------------------


def shift_sum(
    x: torch.Tensor, kernel: int, stride: int = 1, repeat: int = 1, backend: str = "auto"
) -> torch.Tensor:
    """Shift-and-sum: every position map moved to its kernel offset and summed.

    ``out[b, g, i, j] = sum_p x[b, g, p, s*i + dy_p, s*j + dx_p]`` (zeros outside).
    With ``repeat > 1`` each output group is repeated ``repeat`` times along the
    channel axis (``out`` channel ``g * repeat + r``), which is what the
    fixed-kernel group convolution of the paper computes.

    Args:
        x: ``(B, G, K2, H, W)`` with ``K2 = kernel**2``.
        kernel: odd kernel size ``k``.
        stride: output stride ``s``.
        repeat: copies of each group in the output.
        backend: ``"shift"`` (tensor shifts, the default) or ``"reference"``
            (grouped convolution with one-hot kernels).

    Returns:
        ``(B, G * repeat, ceil(H / s), ceil(W / s))``.
    """
    kernel = check_odd_kernel("kernel", kernel)
    stride = check_positive_int("stride", stride)
    repeat = check_positive_int("repeat", repeat)
    check_choice("backend", backend, BACKENDS)
    if x.dim() != 5:
        raise ValueError(f"x must be (B, G, k*k, H, W), got shape {tuple(x.shape)}")
    if kernel * kernel != x.shape[2]:
        raise ValueError(
            f"x has {x.shape[2]} position maps, expected kernel**2 = {kernel * kernel}"
        )
    if choose_backend("shift_sum", (x,), backend) == "reference":
        return reference.shift_sum_reference(x, kernel, stride, repeat)
    out = shift.shift_sum_shift(x, kernel, stride, repeat)
    note_macs(x, kernel * kernel * out.numel())
    return out


def _check_conv_path_args(
    qkv: torch.Tensor,
    fc_weight: torch.Tensor,
    dep_weight: torch.Tensor | None,
    kernel: int,
    out_channels: int,
) -> None:
    if qkv.dim() != 5:
        raise ValueError(f"qkv must be (B, 3N, d, H, W) head features, got {tuple(qkv.shape)}")
    B, M, d, H, W = qkv.shape
    K2 = kernel * kernel
    if fc_weight.numel() != K2 * M:
        raise ValueError(
            f"fc weight {tuple(fc_weight.shape)} does not map {M} head groups (3N) to {K2} maps"
        )
    if out_channels % d:
        raise ValueError(f"out_channels={out_channels} is not a multiple of d={d}")
    if dep_weight is not None and tuple(dep_weight.shape) != (out_channels, K2, kernel, kernel):
        raise ValueError(
            f"grouped-conv weight {tuple(dep_weight.shape)} is not "
            f"{(out_channels, K2, kernel, kernel)} (C_out, k*k, k, k)"
        )


def conv_path(
    qkv: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    dep_weight: torch.Tensor | None,
    kernel: int,
    out_channels: int,
    stride: int = 1,
    shift_mode: str = "learnable",
    backend: str = "auto",
) -> torch.Tensor:
    """The whole ACmix convolution path: fc over head groups, then shift-aggregation.

    Args:
        qkv: ``(B, 3N, d, H, W)`` head features (group ``which * N + head``), any
            strides: contiguous, or Swin's channels-last ``(B, H, W, 3N, d)`` view.
        fc_weight: ``(K2, 3N)`` (a ``(K2, 3N, 1, 1)`` conv weight is accepted).
        fc_bias: ``(K2,)`` or ``None``.
        dep_weight: ``(C_out, K2, k, k)`` grouped-conv kernels for ``shift_mode``
            ``"learnable"`` / ``"fixed"``; ignored for ``"tensor"``.
        kernel: odd conv-path kernel ``k``.
        out_channels: ``C_out`` (a multiple of ``d``).
        stride: output stride.
        shift_mode: ``"learnable"`` / ``"fixed"`` (grouped conv with ``dep_weight``)
            or ``"tensor"`` (explicit shift-and-sum, equal to ``"fixed"`` with one-hot
            kernels).
        backend: one of :data:`~acmix.ops.BACKENDS` (implemented: ``"cpp"``,
            ``"reference"`` = fc einsum + ``F.conv2d``).

    Returns:
        ``(B, C_out, ceil(H / s), ceil(W / s))``; output channel ``o`` comes from
        within-head channel ``o // (C_out / d)``. Channels-last features give a
        channels-last result (the same values).
    """
    kernel = check_odd_kernel("kernel", kernel)
    stride = check_positive_int("stride", stride)
    check_choice("shift_mode", shift_mode, SHIFT_MODES)
    check_choice("backend", backend, BACKENDS)
    _check_conv_path_args(qkv, fc_weight, dep_weight, kernel, out_channels)
    B, M, d, H, W = qkv.shape
    K2 = kernel * kernel
    grouped = shift_mode != "tensor"
    if grouped and dep_weight is None:
        raise ValueError(f"shift_mode={shift_mode!r} needs the grouped-conv weight")
    name = choose_backend("conv_path", (qkv,), backend, grouped=grouped, stride=stride)
    if name == "cpp":
        assert dep_weight is not None
        fc = fc_weight.reshape(K2, M).to(qkv.dtype)
        bias = None if fc_bias is None else fc_bias.to(qkv.dtype)
        dep = dep_weight.to(qkv.dtype)
        if qkv.is_contiguous():
            return cpp.conv_path_cpu(qkv.reshape(B, M * d, H, W), fc, bias, dep, stride)
        # channels-last: (B, H, W, 3N * d) in, (B, H, W, C_out) out
        features = qkv.permute(0, 3, 4, 1, 2).reshape(B, H, W, M * d)
        return cpp.conv_path_cl_cpu(features, fc, bias, dep).permute(0, 3, 1, 2)
    feats = reference.conv_path_features(qkv, fc_weight, fc_bias)
    if not grouped:
        return shift_sum(feats.view(B, d, K2, H, W), kernel, stride, out_channels // d)
    assert dep_weight is not None
    return reference.shift_sum_group_conv(feats, dep_weight, kernel, stride)


def acmix_stage2(
    qkv: torch.Tensor,
    heads: int,
    kernel_att: int,
    padding: str,
    pe: torch.Tensor | None,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
    dep_weight: torch.Tensor | None,
    kernel_conv: int,
    rate1: torch.Tensor,
    rate2: torch.Tensor,
    stride: int = 1,
    shift_mode: str = "learnable",
    mlp: Mlp | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """ACmix's stage II on the shared projections: ``rate1 * attention + rate2 * conv path``.

    Where the C++ kernels apply this is one op (one autograd node that saves
    only ``qkv`` and the log-sum-exp, and writes one gradient of ``qkv``);
    elsewhere it composes :func:`local_attention_qkv`, :func:`conv_path` and
    the mix, each choosing its own backend from ``backend``.

    Args:
        qkv: ``(B, 3C, H, W)`` fused projection, channel ``which * C + head * d + j``.
        heads: ``N``.
        kernel_att, padding, pe, mlp: the attention path, as :func:`local_attention`.
        fc_weight, fc_bias, dep_weight, kernel_conv, shift_mode: the convolution
            path, as :func:`conv_path` (``C_out = C``).
        rate1, rate2: alpha and beta, one element each.
        stride: output stride of both paths.
        backend: one of :data:`~acmix.ops.BACKENDS`.

    Returns:
        ``(B, C, H', W')``.
    """
    B, C3, H, W = qkv.shape
    d = _check_qkv(qkv, heads)
    C = C3 // 3
    kernel_att, stride = _check_window_args(kernel_att, stride, padding, backend, H, W)
    kernel_conv = check_odd_kernel("kernel_conv", kernel_conv)
    check_choice("shift_mode", shift_mode, SHIFT_MODES)
    heads5 = qkv.view(B, 3 * heads, d, H, W)
    _check_conv_path_args(heads5, fc_weight, dep_weight, kernel_conv, C)
    weight = "dot" if mlp is None else "mlp"
    grouped = shift_mode != "tensor"
    name = choose_backend(
        "acmix_stage2", (qkv,), backend, weight=weight, grouped=grouped, stride=stride
    )
    if name == "cpp":
        assert dep_weight is not None
        dt = qkv.dtype
        pe_c, s = _cpp_attention_args(qkv, heads, pe, None)
        out, _ = cpp.acmix_stage2_cpu(
            qkv,
            pe_c,
            fc_weight.reshape(fc_weight.shape[0], -1).to(dt),
            None if fc_bias is None else fc_bias.to(dt),
            dep_weight.to(dt),
            rate1.to(dt),
            rate2.to(dt),
            heads,
            kernel_att,
            padding == "zeros",
            s,
            stride,
        )
        return out
    att = local_attention_qkv(qkv, heads, kernel_att, stride, padding, pe, None, mlp, backend)
    conv = conv_path(
        heads5, fc_weight, fc_bias, dep_weight, kernel_conv, C, stride, shift_mode, backend
    )
    return rate1.to(att.dtype) * att + rate2.to(conv.dtype) * conv


# ----------------------------------------------------------------------------------------
# Window attention, patchwise aggregation
# ----------------------------------------------------------------------------------------


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention with an additive bias: Swin's window attention, PVT's SRA.

    Args:
        q: ``(B_, N, L, d)`` (``B_`` windows or images, ``L`` query tokens each).
        k, v: ``(B_, N, Lk, d)``.
        bias: additive, broadcastable to ``(B_, N, L, Lk)`` (Swin: relative position
            bias plus the shifted-window mask), or ``None``.
        scale: query scale.
        dropout_p: attention dropout probability (applied as given).
        backend: one of :data:`~acmix.ops.BACKENDS` (implemented: ``"sdpa"``,
            ``"reference"`` = explicit softmax).

    Returns:
        ``(B_, N, L, d)``.
    """
    check_choice("backend", backend, BACKENDS)
    if q.dim() != 4 or k.shape[:-2] != q.shape[:-2] or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            "q, k, v must be (B_, N, L, d), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if choose_backend("window_attention", (q, k, v), backend) == "reference":
        return reference.window_attention_reference(q, k, v, bias, scale, dropout_p)
    return sdpa.window_attention_sdpa(q, k, v, bias, scale, dropout_p)


def patchwise_aggregate(
    x: torch.Tensor,
    weight: torch.Tensor,
    kernel: int,
    padding: str = "reflect",
    backend: str = "auto",
) -> torch.Tensor:
    """SAN's patchwise aggregation of a ``k x k`` window with per-pixel weights.

    ``out[b, c, i, j] = sum_p weight[b, c mod G, p, i, j] * x_pad[b, c, i + p // k, j + p % k]``
    (window position ``p`` row-major; ``x_pad`` padded by ``k // 2``). No
    normalisation: the weights are used as they are.

    Args:
        x: ``(B, C, H, W)`` values.
        weight: ``(B, G, k*k, H, W)``; ``C`` a multiple of ``G`` (SAN's
            ``share_planes = C / G`` channels share one weight map).
        kernel: odd window size ``k``.
        padding: ``"reflect"`` (SAN's; needs ``k // 2 < H, W``) or ``"zeros"``.
        backend: one of :data:`~acmix.ops.BACKENDS` (implemented: ``"shift"``,
            shift-and-accumulate with a hand-written backward, and ``"reference"``, ``unfold``).

    Returns:
        ``(B, C, H, W)``.
    """
    check_odd_kernel("kernel", kernel)
    check_choice("padding", padding, ("reflect", "zeros"))
    check_choice("backend", backend, BACKENDS)
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 5:
        raise ValueError(f"weight must be (B, G, k*k, H, W), got shape {tuple(weight.shape)}")
    B, C, H, W = x.shape
    Bw, G, K2, Hw, Ww = weight.shape
    if (Bw, Hw, Ww, K2) != (B, H, W, kernel * kernel):
        raise ValueError(
            f"weight shape {tuple(weight.shape)} does not match x {tuple(x.shape)} and "
            f"kernel {kernel}: expected ({B}, G, {kernel * kernel}, {H}, {W})"
        )
    if C % G:
        raise ValueError(f"x channels ({C}) must be a multiple of the weight channels G ({G})")
    note_macs(x, kernel * kernel * x.numel())
    if choose_backend("patchwise_aggregate", (x, weight), backend) == "reference":
        return reference.patchwise_aggregate_reference(x, weight, kernel, padding)
    return shift.patchwise_aggregate_shift(x, weight, kernel, padding)
