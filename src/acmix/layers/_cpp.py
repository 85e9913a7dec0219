"""Loaders of the fused CPU kernels (``src/acmix/csrc``) and their autograd wrappers.

Two kernels: local attention (:func:`cpu_kernel`) and the convolution path
(:func:`conv_path_kernel`). Each is compiled on first use with
``torch.utils.cpp_extension.load`` (needs a C++ compiler and ninja; the build
is cached by torch, usually under ``~/.cache/torch_extensions``). Where one
cannot be built, its loader returns ``None`` once, with a warning, and the
layers fall back to pure PyTorch. ``ACMIX_NO_CPP=1`` disables both.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_state: dict[str, ModuleType | None] = {}

__all__ = ["CppConvPath", "CppConvPathCL", "CppLocalAttention", "conv_path_kernel", "cpu_kernel"]


# Tuned for the building machine (-march=native): the build name carries a hash of
# the CPU's feature flags, so a home directory shared by different CPUs never
# loads a binary built for another instruction set.
# -fopenmp: at::parallel_for is a header template that is serial unless the
# extension itself is compiled with OpenMP (it then shares torch's libgomp).
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]


def _cpu_tag() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return hashlib.sha1((flags + " ".join(_CFLAGS)).encode()).hexdigest()[:10]


def _load(name: str, source: str) -> ModuleType | None:
    """Build (or load the cached build of) one kernel; ``None`` where disabled or unbuildable."""
    if name in _state:
        return _state[name]
    module = None
    if os.environ.get("ACMIX_NO_CPP", "") not in ("", "0"):
        _state[name] = None
        return None
    try:
        # torch's extension builder warns "No CUDA runtime is found" on every CPU-only
        # machine that has a CUDA build of torch; that is expected here, not news.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load

        module = load(
            name=f"acmix_{name}_{_cpu_tag()}",
            sources=[str(_CSRC / source)],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            verbose=os.environ.get("ACMIX_VERBOSE_BUILD", "") not in ("", "0"),
        )
    except Exception as exc:  # compiler, ninja or headers missing: fall back, loudly once
        warnings.warn(
            f"acmix: the fused CPU kernel {name!r} could not be built "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "using the PyTorch implementation",
            RuntimeWarning,
            stacklevel=3,
        )
        module = None
    _state[name] = module
    return module


def cpu_kernel() -> ModuleType | None:
    """The compiled local-attention kernel, or ``None`` where disabled or unbuildable."""
    return _load("local_attention_cpu", "local_attention_cpu.cpp")


def conv_path_kernel() -> ModuleType | None:
    """The compiled convolution-path kernel, or ``None`` where disabled or unbuildable."""
    return _load("conv_path_cpu", "conv_path_cpu.cpp")


class CppLocalAttention(torch.autograd.Function):
    """Fused CPU local attention over a fused projection ``qkv (B, 3C, H, W)``.

    Saves only ``qkv``, ``pe`` and the log-sum-exp for backward; returns
    ``(B, C, ceil(H / stride), ceil(W / stride))``.
    """

    @staticmethod
    def forward(ctx, qkv, pe, heads: int, kernel: int, zeros: bool, scale: float, stride: int = 1):  # type: ignore[override]
        ext = cpu_kernel()
        assert ext is not None
        out, lse = ext.forward(qkv, pe, heads, kernel, zeros, scale, stride)
        ctx.save_for_backward(qkv, pe, lse)
        ctx.args = (heads, kernel, zeros, scale, stride)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        qkv, pe, lse = ctx.saved_tensors
        heads, kernel, zeros, scale, stride = ctx.args
        ext = cpu_kernel()
        assert ext is not None
        grad_qkv, _, grad_pe = ext.backward(
            grad_out, qkv, pe, lse, heads, kernel, zeros, scale, stride, 1.0
        )
        if grad_pe is not None:
            grad_pe = grad_pe.reshape(pe.shape)
        return grad_qkv, grad_pe, None, None, None, None, None


class CppConvPath(torch.autograd.Function):
    """Fused CPU convolution path (fc + grouped conv) over ``qkv (B, 3C, H, W)``.

    Saves only its inputs (the fc output is recomputed in backward) and returns
    ``(B, C_out, ceil(H / s), ceil(W / s))``.
    """

    @staticmethod
    def forward(ctx, qkv, fc_weight, fc_bias, dep_weight, stride: int):  # type: ignore[override]
        ext = conv_path_kernel()
        assert ext is not None
        ctx.save_for_backward(qkv, fc_weight, fc_bias, dep_weight)
        ctx.stride = stride
        return ext.forward(qkv, fc_weight, fc_bias, dep_weight, stride)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        qkv, fc_weight, fc_bias, dep_weight = ctx.saved_tensors
        ext = conv_path_kernel()
        assert ext is not None
        g_qkv, g_fc, g_bias, g_dep = ext.backward(
            grad_out, qkv, fc_weight, fc_bias, dep_weight, ctx.stride, 1.0, None
        )
        return g_qkv, g_fc, g_bias if fc_bias is not None else None, g_dep, None


class CppConvPathCL(torch.autograd.Function):
    """Fused CPU convolution path on channels-last features ``qkv (B, H, W, 3C)``, stride 1.

    Saves only its inputs (the fc output is recomputed in backward) and returns
    ``(B, H, W, C_out)``.
    """

    @staticmethod
    def forward(ctx, qkv, fc_weight, fc_bias, dep_weight):  # type: ignore[override]
        ext = conv_path_kernel()
        assert ext is not None
        ctx.save_for_backward(qkv, fc_weight, fc_bias, dep_weight)
        return ext.forward_cl(qkv, fc_weight, fc_bias, dep_weight)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        qkv, fc_weight, fc_bias, dep_weight = ctx.saved_tensors
        ext = conv_path_kernel()
        assert ext is not None
        g_qkv, g_fc, g_bias, g_dep = ext.backward_cl(grad_out, qkv, fc_weight, fc_bias, dep_weight)
        return g_qkv, g_fc, g_bias if fc_bias is not None else None, g_dep


class CppACmixStage2(torch.autograd.Function):
    """ACmix's whole stage II on CPU: ``rate1 * attention + rate2 * conv path`` of ``qkv``.

    One autograd node for both fused kernels and the mix: the backward writes a
    single gradient of ``qkv`` (the conv path adds into the attention's), and
    saves only ``qkv``, the log-sum-exp and the (small) weights. The rates'
    gradients need no saved path outputs: ``sum(grad_out * att)`` is the sum of
    the softmax-backward term the attention kernel forms anyway, and
    ``sum(grad_out * conv) = sum(W * dW)`` for the (linear) conv path.

    Args (forward): ``qkv (B, 3C, H, W)``, ``pe (d, H, W)`` or ``None``, fc
    weight ``(K2, 3N)``, fc bias or ``None``, grouped-conv weight
    ``(C_out, K2, k, k)``, ``rate1``, ``rate2`` (one element each), heads,
    attention kernel, masked zero padding, logit scale, stride.
    """

    @staticmethod
    def forward(
        ctx,
        qkv,
        pe,
        fc_weight,
        fc_bias,
        dep_weight,
        rate1,
        rate2,
        heads: int,
        kernel: int,
        zeros: bool,
        scale: float,
        stride: int,
    ):  # type: ignore[override]
        att_ext, conv_ext = cpu_kernel(), conv_path_kernel()
        assert att_ext is not None and conv_ext is not None
        att, lse = att_ext.forward(qkv, pe, heads, kernel, zeros, scale, stride)
        # out = rate1 * att + rate2 * conv path, written into att by the conv kernel
        out = conv_ext.forward(
            qkv, fc_weight, fc_bias, dep_weight, stride, att, float(rate1), float(rate2)
        )
        ctx.save_for_backward(qkv, pe, lse, fc_weight, fc_bias, dep_weight, rate1, rate2)
        ctx.args = (heads, kernel, zeros, scale, stride)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        qkv, pe, lse, fc_weight, fc_bias, dep_weight, rate1, rate2 = ctx.saved_tensors
        heads, kernel, zeros, scale, stride = ctx.args
        att_ext, conv_ext = cpu_kernel(), conv_path_kernel()
        assert att_ext is not None and conv_ext is not None
        go = grad_out.contiguous()
        alpha, beta = float(rate1), float(rate2)
        # (pe's gradient is the attention's alone: taken before the conv path adds in)
        grad_qkv, go_dot_att, grad_pe = att_ext.backward(
            go, qkv, pe, lse, heads, kernel, zeros, scale, stride, alpha
        )
        if grad_pe is not None:
            grad_pe = grad_pe.reshape(pe.shape)
        _, g_fc, g_bias, g_dep = conv_ext.backward(
            go, qkv, fc_weight, fc_bias, dep_weight, stride, beta, grad_qkv
        )
        g_rate2 = (dep_weight * g_dep).sum().reshape(rate2.shape)  # = sum(grad_out * conv)
        return (
            grad_qkv,
            grad_pe,
            g_fc.mul_(beta),
            g_bias.mul_(beta) if fc_bias is not None else None,
            g_dep.mul_(beta),
            go_dot_att.reshape(rate1.shape),
            g_rate2,
            None,
            None,
            None,
            None,
            None,
        )
