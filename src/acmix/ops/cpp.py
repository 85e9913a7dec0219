"""The ``"cpp"`` backend: the fused CPU kernels of ``src/acmix/csrc`` as registered torch ops.

Each kernel direction is a ``torch.library`` custom op in the ``acmix``
namespace with a fake (meta) implementation, its autograd formula and its FLOP
formula registered, so that ``torch.compile`` (``fullgraph=True``),
``torch.export`` and ``FlopCounterMode`` each see one op:

==================================  ===============================================
op                                  computes
==================================  ===============================================
``acmix::local_attention_cpu``      local attention over a fused ``qkv (B, 3C, H, W)``
``acmix::conv_path_cpu``            the convolution path (fc + grouped conv), NCHW
``acmix::conv_path_cl_cpu``         the same on channels-last ``(B, H, W, 3C)``, stride 1
``acmix::acmix_stage2_cpu``         ACmix's whole stage II: ``rate1 * att + rate2 * conv``
``acmix::*_backward``               their backwards (once differentiable)
==================================  ===============================================

The kernels are compiled on first use with ``torch.utils.cpp_extension.load``
(a C++ compiler and ninja). The build is keyed by a hash of the kernel's
source, the compiler flags and the CPU's feature flags, so identical sources
share one build and different versions never evict each other; stderr says
when a build starts (and that it usually takes 30-90 s) and how long it took.
Where a kernel cannot be built, or with ``ACMIX_NO_CPP=1``, this backend is
unavailable (one warning) and ``"auto"`` chooses a PyTorch backend.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from acmix.ops.common import out_size, refuse_double_backward
from acmix.utils.io import atomic_write_bytes

__all__ = ["kernel", "kernel_built", "unavailable"]

_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_SOURCES = {"attention": "local_attention_cpu.cpp", "conv_path": "conv_path_cpu.cpp"}
_state: dict[str, ModuleType | None] = {}

# Tuned for the building machine (-march=native). -fopenmp: at::parallel_for is a
# header template that is serial unless the extension itself is compiled with OpenMP
# (it then shares torch's libgomp).
_CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return ""


def build_name(name: str) -> str:
    """The extension's build name: kernel name + a hash of source, flags, CPU and torch."""
    h = hashlib.sha256((_CSRC / _SOURCES[name]).read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(_cpu_flags().encode())
    h.update(torch.__version__.encode())
    return f"acmix_{name}_{h.hexdigest()[:16]}"


def _stable_source(name: str, build: str, build_dir: Path) -> Path:
    """The kernel's source at a path fixed by its build name (``<build dir>/<build>.cpp``).

    torch's builder writes the source *path* into its ninja file, so two
    checkouts compiling the same source from their own trees rewrite each
    other's build and recompile it on every import. The build name already
    hashes the source, so one copy per name serves every checkout and version
    with that source: identical sources share one build, different ones never
    touch it.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    src = build_dir / f"{build}.cpp"
    data = (_CSRC / _SOURCES[name]).read_bytes()
    if not src.is_file() or src.read_bytes() != data:
        atomic_write_bytes(src, data)
    return src


def _disabled() -> bool:
    return os.environ.get("ACMIX_NO_CPP", "") not in ("", "0")


def kernel(name: str) -> ModuleType | None:
    """The compiled kernel ``"attention"`` or ``"conv_path"``.

    ``None`` where disabled (``ACMIX_NO_CPP=1``) or unbuildable, with one warning.
    """
    if name in _state:
        return _state[name]
    module = None
    if _disabled():
        warnings.warn(
            f"acmix: ACMIX_NO_CPP is set: the fused CPU kernel {name!r} is disabled; "
            "using the PyTorch implementation",
            RuntimeWarning,
            stacklevel=2,
        )
        _state[name] = None
        return None
    try:
        # torch's extension builder warns "No CUDA runtime is found" on every CPU-only
        # machine that has a CUDA build of torch; that is expected here, not news.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import _get_build_directory, load

        build = build_name(name)
        build_dir = Path(_get_build_directory(build, False))
        fresh = not (build_dir / f"{build}.so").exists()
        if fresh:
            print(
                f"acmix: building the C++ kernel {name!r} ({build}), once per kernel version "
                f"and machine; this usually takes 30-90 s (cached in "
                f"{build_dir}) ...",
                file=sys.stderr,
                flush=True,
            )
        start = time.perf_counter()
        module = load(
            name=build,
            sources=[str(_stable_source(name, build, build_dir))],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            verbose=os.environ.get("ACMIX_VERBOSE_BUILD", "") not in ("", "0"),
        )
        if fresh:
            took = time.perf_counter() - start
            print(f"acmix: built {name!r} in {took:.1f} s", file=sys.stderr)
    except Exception as exc:  # compiler, ninja or headers missing: fall back, loudly once
        first = str(exc).splitlines()[0] if str(exc) else ""
        warnings.warn(
            f"acmix: the fused CPU kernel {name!r} could not be built "
            f"({exc.__class__.__name__}: {first}); using the PyTorch implementation",
            RuntimeWarning,
            stacklevel=2,
        )
        module = None
    _state[name] = module
    return module


@torch.compiler.assume_constant_result
def kernel_built(name: str) -> bool:
    """Whether kernel ``name`` is available (builds it on first call; a constant to dynamo)."""
    return kernel(name) is not None


def _ext(name: str) -> ModuleType:
    module = kernel(name)
    if module is None:
        raise RuntimeError(f"acmix: the C++ kernel {name!r} is not available")
    return module


#: The compiled kernels each op needs.
_KERNELS_OF: dict[str, tuple[str, ...]] = {
    "local_attention": ("attention",),
    "conv_path": ("conv_path",),
    "acmix_stage2": ("attention", "conv_path"),
}


def unavailable(op: str, tensors: Sequence[Tensor], facts: dict[str, Any]) -> str | None:
    """Why the C++ kernels cannot run ``op`` on these tensors (``None``: they can)."""
    if op not in _KERNELS_OF:
        return f"no C++ kernel for {op}"
    if torch.jit.is_tracing():
        return "torch.jit tracing keeps graphs in plain aten ops (ONNX export)"
    t = tensors[0]
    if t.device.type != "cpu":
        return f"needs CPU tensors, got {t.device.type}"
    if t.dtype not in (torch.float32, torch.float64):
        return f"needs float32 / float64, got {t.dtype}"
    if op in ("local_attention", "acmix_stage2") and facts.get("weight", "dot") != "dot":
        return f"dot-product attention weights only, got {facts['weight']!r}"
    if op in ("conv_path", "acmix_stage2"):
        if not facts.get("grouped", True):
            return "the tensor-shift form of the convolution path has no kernel"
        if op == "acmix_stage2" and not t.is_contiguous():
            return "stage II needs contiguous (B, 3C, H, W) projections"
        if not t.is_contiguous():
            channels_last = t.dim() == 5 and t.permute(0, 3, 4, 1, 2).is_contiguous()
            if not channels_last or facts.get("stride", 1) != 1:
                return "needs contiguous (B, 3N, d, H, W) features, or channels-last at stride 1"
    for name in _KERNELS_OF[op]:
        if not kernel_built(name):
            return f"the C++ kernel {name!r} is not built (ACMIX_NO_CPP set, or no compiler)"
    return None


def _opt(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


def _empty_like_opt(ref: Tensor, t: Tensor | None) -> Tensor:
    """Gradient placeholder of an optional input: ``(0,)`` when it is absent."""
    return ref.new_empty(0) if t is None else torch.empty_like(t)


def _attention_macs(qkv: Sequence[int], kernel: int, stride: int) -> int:
    B, C3, H, W = qkv
    return 2 * kernel * kernel * (C3 // 3) * B * out_size(H, stride) * out_size(W, stride)


def _conv_macs(
    B: int, H: int, W: int, MD: int, fc: Sequence[int], dep: Sequence[int], s: int
) -> int:
    K2, M = fc
    Cout = dep[0]
    d = MD // M
    return B * d * K2 * M * H * W + B * Cout * K2 * K2 * out_size(H, s) * out_size(W, s)


# ----------------------------------------------------------------------------------------
# Local attention
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("acmix::local_attention_cpu", mutates_args=(), device_types="cpu")
def local_attention_cpu(
    qkv: Tensor, pe: Tensor | None, heads: int, kernel: int, zeros: bool, scale: float, stride: int
) -> tuple[Tensor, Tensor]:
    """Fused local attention of ``qkv (B, 3C, H, W)`` with ``pe (d, H, W)``.

    Returns ``out (B, C, H', W')`` and the log-sum-exp ``(B, N, H, W)``.
    """
    out, lse = _ext("attention").forward(
        qkv.contiguous(), _opt(pe), heads, kernel, zeros, scale, stride
    )
    return out, lse


@local_attention_cpu.register_fake
def _(qkv, pe, heads, kernel, zeros, scale, stride):
    B, C3, H, W = qkv.shape
    out = qkv.new_empty(B, C3 // 3, out_size(H, stride), out_size(W, stride))
    return out, qkv.new_empty(B, heads, H, W)


@torch.library.custom_op("acmix::local_attention_cpu_backward", mutates_args=(), device_types="cpu")
def local_attention_cpu_backward(
    grad_out: Tensor,
    qkv: Tensor,
    pe: Tensor | None,
    lse: Tensor,
    heads: int,
    kernel: int,
    zeros: bool,
    scale: float,
    stride: int,
) -> tuple[Tensor, Tensor]:
    """Gradients ``(grad_qkv, grad_pe)`` of :func:`local_attention_cpu`.

    ``grad_pe`` is ``(0,)`` without pe.
    """
    g_qkv, _, g_pe = _ext("attention").backward(
        grad_out.contiguous(),
        qkv.contiguous(),
        _opt(pe),
        lse,
        heads,
        kernel,
        zeros,
        scale,
        stride,
        1.0,
    )
    return g_qkv, qkv.new_empty(0) if g_pe is None else g_pe.reshape(pe.shape)


@local_attention_cpu_backward.register_fake
def _(grad_out, qkv, pe, lse, heads, kernel, zeros, scale, stride):
    return torch.empty_like(qkv), _empty_like_opt(qkv, pe)


def _attention_setup(ctx, inputs, output):
    qkv, pe, *args = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(qkv, pe, output[1])
    ctx.args = args


def _attention_backward(ctx, grad_out, _grad_lse):
    refuse_double_backward("local_attention (cpp)")
    qkv, pe, lse = ctx.saved_tensors
    g_qkv, g_pe = local_attention_cpu_backward(grad_out, qkv, pe, lse, *ctx.args)
    return g_qkv, (g_pe if pe is not None else None), None, None, None, None, None


local_attention_cpu.register_autograd(_attention_backward, setup_context=_attention_setup)


@register_flop_formula(torch.ops.acmix.local_attention_cpu)
def _(qkv, pe, heads, kernel, zeros, scale, stride, *args, **kwargs) -> int:
    return 2 * _attention_macs(qkv, kernel, stride)


@register_flop_formula(torch.ops.acmix.local_attention_cpu_backward)
def _(grad_out, qkv, pe, lse, heads, kernel, zeros, scale, stride, *args, **kwargs) -> int:
    return 4 * _attention_macs(qkv, kernel, stride)


# ----------------------------------------------------------------------------------------
# Convolution path, NCHW and channels-last
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("acmix::conv_path_cpu", mutates_args=(), device_types="cpu")
def conv_path_cpu(
    qkv: Tensor, fc_weight: Tensor, fc_bias: Tensor | None, dep_weight: Tensor, stride: int
) -> Tensor:
    """Fused conv path of ``qkv (B, 3N*d, H, W)`` -> ``(B, C_out, H', W')``.

    fc ``(K2, 3N)``, its bias ``(K2,)`` or ``None``, dep ``(C_out, K2, k, k)``.
    """
    return _ext("conv_path").forward(
        qkv.contiguous(), fc_weight.contiguous(), _opt(fc_bias), dep_weight.contiguous(), stride
    )


@conv_path_cpu.register_fake
def _(qkv, fc_weight, fc_bias, dep_weight, stride):
    B, _, H, W = qkv.shape
    return qkv.new_empty(B, dep_weight.shape[0], out_size(H, stride), out_size(W, stride))


@torch.library.custom_op("acmix::conv_path_cpu_backward", mutates_args=(), device_types="cpu")
def conv_path_cpu_backward(
    grad_out: Tensor,
    qkv: Tensor,
    fc_weight: Tensor,
    fc_bias: Tensor | None,
    dep_weight: Tensor,
    stride: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(qkv, fc weight, fc bias or (0,), dep weight)`` of :func:`conv_path_cpu`."""
    g_qkv, g_fc, g_b, g_dep = _ext("conv_path").backward(
        grad_out.contiguous(),
        qkv.contiguous(),
        fc_weight.contiguous(),
        _opt(fc_bias),
        dep_weight.contiguous(),
        stride,
        1.0,
        None,
    )
    return g_qkv, g_fc, qkv.new_empty(0) if fc_bias is None else g_b, g_dep


@conv_path_cpu_backward.register_fake
def _(grad_out, qkv, fc_weight, fc_bias, dep_weight, stride):
    return (
        torch.empty_like(qkv),
        torch.empty_like(fc_weight),
        _empty_like_opt(qkv, fc_bias),
        torch.empty_like(dep_weight),
    )


@torch.library.custom_op("acmix::conv_path_cl_cpu", mutates_args=(), device_types="cpu")
def conv_path_cl_cpu(
    qkv: Tensor, fc_weight: Tensor, fc_bias: Tensor | None, dep_weight: Tensor
) -> Tensor:
    """Fused conv path on channels-last ``qkv (B, H, W, 3N*d)`` -> ``(B, H, W, C_out)``."""
    return _ext("conv_path").forward_cl(
        qkv.contiguous(), fc_weight.contiguous(), _opt(fc_bias), dep_weight.contiguous()
    )


@conv_path_cl_cpu.register_fake
def _(qkv, fc_weight, fc_bias, dep_weight):
    B, H, W, _ = qkv.shape
    return qkv.new_empty(B, H, W, dep_weight.shape[0])


@torch.library.custom_op("acmix::conv_path_cl_cpu_backward", mutates_args=(), device_types="cpu")
def conv_path_cl_cpu_backward(
    grad_out: Tensor, qkv: Tensor, fc_weight: Tensor, fc_bias: Tensor | None, dep_weight: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(qkv, fc weight, fc bias or (0,), dep weight)`` of :func:`conv_path_cl_cpu`."""
    g_qkv, g_fc, g_b, g_dep = _ext("conv_path").backward_cl(
        grad_out.contiguous(),
        qkv.contiguous(),
        fc_weight.contiguous(),
        _opt(fc_bias),
        dep_weight.contiguous(),
    )
    return g_qkv, g_fc, qkv.new_empty(0) if fc_bias is None else g_b, g_dep


@conv_path_cl_cpu_backward.register_fake
def _(grad_out, qkv, fc_weight, fc_bias, dep_weight):
    return (
        torch.empty_like(qkv),
        torch.empty_like(fc_weight),
        _empty_like_opt(qkv, fc_bias),
        torch.empty_like(dep_weight),
    )


def _conv_setup(ctx, inputs, output):
    qkv, fc_weight, fc_bias, dep_weight, *args = inputs
    ctx.save_for_backward(qkv, fc_weight, fc_bias, dep_weight)
    ctx.args = args


def _conv_grads(grads, fc_bias, n_extra):
    g_qkv, g_fc, g_b, g_dep = grads
    return (g_qkv, g_fc, g_b if fc_bias is not None else None, g_dep) + (None,) * n_extra


def _conv_backward(ctx, grad_out):
    refuse_double_backward("conv_path (cpp)")
    qkv, fc_w, fc_b, dep = ctx.saved_tensors
    return _conv_grads(conv_path_cpu_backward(grad_out, qkv, fc_w, fc_b, dep, *ctx.args), fc_b, 1)


def _conv_cl_backward(ctx, grad_out):
    refuse_double_backward("conv_path (cpp)")
    qkv, fc_w, fc_b, dep = ctx.saved_tensors
    return _conv_grads(conv_path_cl_cpu_backward(grad_out, qkv, fc_w, fc_b, dep), fc_b, 0)


conv_path_cpu.register_autograd(_conv_backward, setup_context=_conv_setup)
conv_path_cl_cpu.register_autograd(_conv_cl_backward, setup_context=_conv_setup)


@register_flop_formula(torch.ops.acmix.conv_path_cpu)
def _(qkv, fc_weight, fc_bias, dep_weight, stride, *args, **kwargs) -> int:
    B, MD, H, W = qkv
    return 2 * _conv_macs(B, H, W, MD, fc_weight, dep_weight, stride)


@register_flop_formula(torch.ops.acmix.conv_path_cpu_backward)
def _(grad_out, qkv, fc_weight, fc_bias, dep_weight, stride, *args, **kwargs) -> int:
    B, MD, H, W = qkv
    return 4 * _conv_macs(B, H, W, MD, fc_weight, dep_weight, stride)


@register_flop_formula(torch.ops.acmix.conv_path_cl_cpu)
def _(qkv, fc_weight, fc_bias, dep_weight, *args, **kwargs) -> int:
    B, H, W, MD = qkv
    return 2 * _conv_macs(B, H, W, MD, fc_weight, dep_weight, 1)


@register_flop_formula(torch.ops.acmix.conv_path_cl_cpu_backward)
def _(grad_out, qkv, fc_weight, fc_bias, dep_weight, *args, **kwargs) -> int:
    B, H, W, MD = qkv
    return 4 * _conv_macs(B, H, W, MD, fc_weight, dep_weight, 1)


# ----------------------------------------------------------------------------------------
# Stage II: attention + convolution path + mix, one node
# ----------------------------------------------------------------------------------------


@torch.library.custom_op("acmix::acmix_stage2_cpu", mutates_args=(), device_types="cpu")
def acmix_stage2_cpu(
    qkv: Tensor,
    pe: Tensor | None,
    fc_weight: Tensor,
    fc_bias: Tensor | None,
    dep_weight: Tensor,
    rate1: Tensor,
    rate2: Tensor,
    heads: int,
    kernel: int,
    zeros: bool,
    scale: float,
    stride: int,
) -> tuple[Tensor, Tensor]:
    """``rate1 * attention + rate2 * conv path`` of ``qkv (B, 3C, H, W)`` -> ``(out, lse)``.

    The conv-path kernel writes the mix into the attention output: one pass and
    one activation-sized tensor fewer than the composed ops.
    """
    qkv = qkv.contiguous()
    att, lse = _ext("attention").forward(qkv, _opt(pe), heads, kernel, zeros, scale, stride)
    out = _ext("conv_path").forward(
        qkv,
        fc_weight.contiguous(),
        _opt(fc_bias),
        dep_weight.contiguous(),
        stride,
        att,
        float(rate1),
        float(rate2),
    )
    return out, lse


@acmix_stage2_cpu.register_fake
def _(qkv, pe, fc_weight, fc_bias, dep_weight, rate1, rate2, heads, kernel, zeros, scale, stride):
    B, _, H, W = qkv.shape
    out = qkv.new_empty(B, dep_weight.shape[0], out_size(H, stride), out_size(W, stride))
    return out, qkv.new_empty(B, heads, H, W)


@torch.library.custom_op("acmix::acmix_stage2_cpu_backward", mutates_args=(), device_types="cpu")
def acmix_stage2_cpu_backward(
    grad_out: Tensor,
    qkv: Tensor,
    pe: Tensor | None,
    lse: Tensor,
    fc_weight: Tensor,
    fc_bias: Tensor | None,
    dep_weight: Tensor,
    rate1: Tensor,
    rate2: Tensor,
    heads: int,
    kernel: int,
    zeros: bool,
    scale: float,
    stride: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`acmix_stage2_cpu`: qkv, pe, fc weight, fc bias, dep weight, rates.

    One gradient of ``qkv`` (the conv path adds into the attention's). The
    rates' gradients need no saved path outputs: ``sum(grad_out * att)`` comes
    out of the attention backward, and ``sum(grad_out * conv) = sum(W * dW)``
    for the (linear) conv path.
    """
    go, qkv = grad_out.contiguous(), qkv.contiguous()
    fc_w, fc_b, dep = fc_weight.contiguous(), _opt(fc_bias), dep_weight.contiguous()
    alpha, beta = float(rate1), float(rate2)
    # (pe's gradient is the attention's alone: taken before the conv path adds in)
    g_qkv, go_dot_att, g_pe = _ext("attention").backward(
        go, qkv, _opt(pe), lse, heads, kernel, zeros, scale, stride, alpha
    )
    _, g_fc, g_b, g_dep = _ext("conv_path").backward(go, qkv, fc_w, fc_b, dep, stride, beta, g_qkv)
    g_rate2 = (dep * g_dep).sum().reshape(rate2.shape)
    return (
        g_qkv,
        qkv.new_empty(0) if g_pe is None else g_pe.reshape(pe.shape),
        g_fc.mul_(beta),
        qkv.new_empty(0) if fc_bias is None else g_b.mul_(beta),
        g_dep.mul_(beta),
        go_dot_att.reshape(rate1.shape).to(rate1.dtype),
        g_rate2.to(rate2.dtype),
    )


@acmix_stage2_cpu_backward.register_fake
def _(grad_out, qkv, pe, lse, fc_weight, fc_bias, dep_weight, rate1, rate2, *args):
    return (
        torch.empty_like(qkv),
        _empty_like_opt(qkv, pe),
        torch.empty_like(fc_weight),
        _empty_like_opt(qkv, fc_bias),
        torch.empty_like(dep_weight),
        torch.empty_like(rate1),
        torch.empty_like(rate2),
    )


def _stage2_setup(ctx, inputs, output):
    qkv, pe, fc_w, fc_b, dep, rate1, rate2, *args = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(qkv, pe, output[1], fc_w, fc_b, dep, rate1, rate2)
    ctx.args = args


def _stage2_backward(ctx, grad_out, _grad_lse):
    refuse_double_backward("acmix_stage2 (cpp)")
    qkv, pe, lse, fc_w, fc_b, dep, rate1, rate2 = ctx.saved_tensors
    g = acmix_stage2_cpu_backward(grad_out, qkv, pe, lse, fc_w, fc_b, dep, rate1, rate2, *ctx.args)
    g_qkv, g_pe, g_fc, g_b, g_dep, g_r1, g_r2 = g
    return (
        g_qkv,
        g_pe if pe is not None else None,
        g_fc,
        g_b if fc_b is not None else None,
        g_dep,
        g_r1,
        g_r2,
    ) + (None,) * 5


acmix_stage2_cpu.register_autograd(_stage2_backward, setup_context=_stage2_setup)


def _stage2_macs(qkv, fc_weight, dep_weight, kernel, stride) -> int:
    B, MD, H, W = qkv
    att = _attention_macs(qkv, kernel, stride)
    return att + _conv_macs(B, H, W, MD, fc_weight, dep_weight, stride)


@register_flop_formula(torch.ops.acmix.acmix_stage2_cpu)
def _(qkv, pe, fc_w, fc_b, dep, r1, r2, heads, kernel, zeros, scale, stride, *a, **k) -> int:
    return 2 * _stage2_macs(qkv, fc_w, dep, kernel, stride)


@register_flop_formula(torch.ops.acmix.acmix_stage2_cpu_backward)
def _(go, qkv, pe, lse, fc_w, fc_b, dep, r1, r2, heads, kernel, zeros, scale, stride, *a, **k):
    return 4 * _stage2_macs(qkv, fc_w, dep, kernel, stride)
