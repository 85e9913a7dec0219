"""Loader of the fused CPU local-attention kernel (``src/acmix/csrc``).

The kernel is compiled on first use with ``torch.utils.cpp_extension.load``
(needs a C++ compiler and ninja; the build is cached by torch, usually under
``~/.cache/torch_extensions``). Where it cannot be built, :func:`cpu_kernel`
returns ``None`` once, with a warning, and the attention falls back to the
pure-PyTorch shift backend. ``ACMIX_NO_CPP=1`` disables it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "local_attention_cpu.cpp"
_state: dict[str, ModuleType | None] = {}

__all__ = ["cpu_kernel", "cpu_kernel_available"]


# Tuned for the building machine (-march=native): the build name carries a hash of
# the CPU's feature flags, so a home directory shared by different CPUs never
# loads a binary built for another instruction set.
_CFLAGS = ["-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno"]


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


def cpu_kernel() -> ModuleType | None:
    """The compiled kernel module, or ``None`` where it is disabled or cannot be built."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("ACMIX_NO_CPP", "") not in ("", "0"):
        _state["module"] = None
        return None
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name=f"acmix_local_attention_cpu_{_cpu_tag()}",
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            verbose=os.environ.get("ACMIX_VERBOSE_BUILD", "") not in ("", "0"),
        )
    except Exception as exc:  # compiler, ninja or headers missing: fall back, loudly once
        warnings.warn(
            f"acmix: the fused CPU attention kernel could not be built ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); using the PyTorch shift backend",
            RuntimeWarning,
            stacklevel=2,
        )
        module = None
    _state["module"] = module
    return module


def cpu_kernel_available() -> bool:
    """Whether the fused CPU kernel is (or can be) loaded."""
    return cpu_kernel() is not None


class CppLocalAttention(torch.autograd.Function):
    """Fused CPU local attention; saves q, padded k / v and the log-sum-exp for backward."""

    @staticmethod
    def forward(ctx, q, k_pad, v_pad, bias, kernel: int, stride: int):  # type: ignore[override]
        ext = cpu_kernel()
        assert ext is not None
        out, lse = ext.forward(q, k_pad, v_pad, bias, kernel, stride)
        ctx.save_for_backward(q, k_pad, v_pad, bias, lse)
        ctx.kernel, ctx.stride = kernel, stride
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k_pad, v_pad, bias, lse = ctx.saved_tensors
        ext = cpu_kernel()
        assert ext is not None
        gq, gk, gv = ext.backward(grad_out, q, k_pad, v_pad, bias, lse, ctx.kernel, ctx.stride)
        return gq, gk, gv, None, None, None
