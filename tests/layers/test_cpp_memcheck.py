"""The fused CPU kernels under AddressSanitizer: no out-of-bounds access on any geometry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "src" / "acmix" / "csrc"

SCRIPT = textwrap.dedent(
    """
    import itertools, sys, torch
    from torch.utils.cpp_extension import load
    flags = dict(extra_cflags=["-O1", "-g", "-fopenmp", "-march=native", "-fsanitize=address",
                               "-fno-omit-frame-pointer"],
                 extra_ldflags=["-fsanitize=address", "-fopenmp"])
    ext = load(name="acmix_asan_attention", sources=[sys.argv[1] + "/local_attention_cpu.cpp"],
               build_directory=sys.argv[2], **flags)
    conv = load(name="acmix_asan_conv_path", sources=[sys.argv[1] + "/conv_path_cpu.cpp"],
                build_directory=sys.argv[2], **flags)
    torch.manual_seed(0)
    shapes = [(2, 2, 4, 7, 7, 7, False), (1, 2, 3, 2, 3, 7, True), (1, 1, 8, 1, 1, 5, True),
              (2, 4, 16, 28, 28, 7, False), (1, 3, 5, 9, 11, 3, True), (1, 2, 4, 14, 5, 5, False),
              (2, 2, 16, 13, 40, 7, True), (1, 1, 2, 6, 6, 9, True),
              (1, 2, 8, 61, 30, 7, False), (1, 1, 4, 70, 17, 7, True)]
    for dt, (B, N, d, H, W, k, zeros) in itertools.product((torch.float32, torch.float64), shapes):
        qkv = torch.randn(B, 3 * N * d, H, W, dtype=dt)
        pe = torch.randn(d, H, W, dtype=dt)
        for step in (1, 2, 3):
            out, lse = ext.forward(qkv, pe, N, k, zeros, 0.3, step)
            g, _, _ = ext.backward(torch.randn_like(out), qkv, pe, lse, N, k, zeros, 0.3, step, 0.7)
            assert torch.isfinite(out).all() and torch.isfinite(g).all()
    # conv path: (B, N, d, H, W, k, stride, outputs per group, bias)
    conv_shapes = [(2, 4, 5, 9, 11, 3, 1, 4, False), (1, 2, 3, 8, 7, 3, 2, 4, True),
                   (1, 3, 4, 13, 10, 5, 2, 2, True), (1, 2, 2, 5, 6, 3, 3, 8, True),
                   (1, 1, 3, 1, 1, 3, 1, 1, False), (1, 4, 16, 19, 37, 3, 1, 4, False),
                   (2, 8, 2, 4, 4, 3, 1, 9, True), (1, 4, 2, 2, 33, 5, 2, 3, False)]
    for dt, (B, N, d, H, W, k, s, per, bias) in itertools.product(
            (torch.float32, torch.float64), conv_shapes):
        qkv = torch.randn(B, 3 * N * d, H, W, dtype=dt)
        fw = torch.randn(k * k, 3 * N, dtype=dt)
        fb = torch.randn(k * k, dtype=dt) if bias else None
        dw = torch.randn(per * d, k * k, k, k, dtype=dt)
        out = conv.forward(qkv, fw, fb, dw, s)
        conv.forward(qkv, fw, fb, dw, s, out.clone(), 0.5, 2.0)  # mixed in place
        grads = conv.backward(torch.randn_like(out), qkv, fw, fb, dw, s, 0.7, None)
        conv.backward(torch.randn_like(out), qkv, fw, fb, dw, s, 1.0, grads[0])  # accumulate
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(t).all() for t in grads if t is not None)
    # channels-last forward and backward: (B, N, d, H, W, k, outputs per group, bias)
    for dt, (B, N, d, H, W, k, per, bias) in itertools.product(
            (torch.float32, torch.float64),
            [(2, 3, 32, 14, 14, 3, 3, True), (1, 2, 5, 7, 9, 3, 2, False),
             (1, 1, 8, 30, 3, 3, 7, False), (1, 2, 4, 3, 3, 7, 2, True)]):
        qkv = torch.randn(B, H, W, 3 * N * d, dtype=dt)
        fw = torch.randn(k * k, 3 * N, dtype=dt)
        fb = torch.randn(k * k, dtype=dt) if bias else None
        dw = torch.randn(per * d, k * k, k, k, dtype=dt)
        out = conv.forward_cl(qkv, fw, fb, dw)
        grads = conv.backward_cl(torch.randn_like(out), qkv, fw, fb, dw)
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(t).all() for t in grads if t is not None)
    print("memcheck ok")
    """
)


def _libasan() -> str | None:
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    path = subprocess.run(
        [cxx, "-print-file-name=libasan.so"], capture_output=True, text=True
    ).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.slow
@pytest.mark.skipif(_libasan() is None, reason="needs g++ with AddressSanitizer (libasan)")
def test_kernel_has_no_out_of_bounds_access(tmp_path) -> None:
    env = dict(os.environ, LD_PRELOAD=_libasan() or "", ASAN_OPTIONS="detect_leaks=0")
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(CSRC), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0 and "memcheck ok" in run.stdout, run.stderr[-3000:]
