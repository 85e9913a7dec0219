"""The fused CPU kernel under AddressSanitizer: no out-of-bounds access on any geometry."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "src" / "acmix" / "csrc" / "local_attention_cpu.cpp"

SCRIPT = textwrap.dedent(
    """
    import itertools, sys, torch
    from torch.utils.cpp_extension import load
    ext = load(name="acmix_asan_check", sources=[sys.argv[1]], build_directory=sys.argv[2],
               extra_cflags=["-O1", "-g", "-fopenmp", "-march=native", "-fsanitize=address",
                             "-fno-omit-frame-pointer"],
               extra_ldflags=["-fsanitize=address", "-fopenmp"])
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
            g = ext.backward(torch.randn_like(out), qkv, pe, lse, N, k, zeros, 0.3, step)
            assert torch.isfinite(out).all() and torch.isfinite(g).all()
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
        [sys.executable, "-c", SCRIPT, str(SOURCE), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0 and "memcheck ok" in run.stdout, run.stderr[-3000:]
