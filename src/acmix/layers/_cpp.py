"""Loader of the fused CPU local-attention kernel (``src/acmix/csrc``).

The kernel is compiled on first use with ``torch.utils.cpp_extension.load``
(needs a C++ compiler and ninja; the build is cached by torch, usually under
``~/.cache/torch_extensions``). Where it cannot be built, :func:`cpu_kernel`
returns ``None`` once, with a warning, and the attention falls back to the
pure-PyTorch shift backend. ``ACMIX_NO_CPP=1`` disables it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

_SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "local_attention_cpu.cpp"
_state: dict[str, ModuleType | None] = {}

__all__ = ["CppLocalAttention", "cpu_kernel"]


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


def cpu_kernel() -> ModuleType | None:
    """The compiled kernel module, or ``None`` where it is disabled or cannot be built."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("ACMIX_NO_CPP", "") not in ("", "0"):
        _state["module"] = None
        return None
    try:
        # torch's extension builder warns "No CUDA runtime is found" on every CPU-only
        # machine that has a CUDA build of torch; that is expected here, not news.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        from torch.utils.cpp_extension import load

        module = load(
            name=f"acmix_local_attention_cpu_{_cpu_tag()}",
            sources=[str(_SOURCE)],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
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


class CppLocalAttention(torch.autograd.Function):
    """Fused CPU local attention (stride 1) over a fused projection ``qkv (B, 3C, H, W)``.

    Saves only ``qkv``, ``pe`` and the log-sum-exp for backward; returns
    ``(B, C, H, W)`` in which only the rows ``0, row_step, 2 row_step, ...`` are
    computed (the others are zero).
    """

    @staticmethod
    def forward(
        ctx, qkv, pe, heads: int, kernel: int, zeros: bool, scale: float, row_step: int = 1
    ):  # type: ignore[override]
        ext = cpu_kernel()
        assert ext is not None
        out, lse = ext.forward(qkv, pe, heads, kernel, zeros, scale, row_step)
        ctx.save_for_backward(qkv, pe, lse)
        ctx.args = (heads, kernel, zeros, scale, row_step)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        qkv, pe, lse = ctx.saved_tensors
        heads, kernel, zeros, scale, row_step = ctx.args
        ext = cpu_kernel()
        assert ext is not None
        grad_qkv = ext.backward(grad_out, qkv, pe, lse, heads, kernel, zeros, scale, row_step)
        grad_pe = None
        if pe is not None and ctx.needs_input_grad[1]:
            # keys enter as k - pe: pe's gradient is minus the keys', summed over batch and heads.
            B, C3, H, W = qkv.shape
            C = C3 // 3
            grad_k = grad_qkv[:, C : 2 * C].reshape(B, heads, C // heads, H, W)
            grad_pe = -grad_k.sum(dim=(0, 1)).reshape(pe.shape)
        return grad_qkv, grad_pe, None, None, None, None, None
