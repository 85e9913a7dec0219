"""The ``"triton"`` backend of the local attention: its choice, its interpreter sweep, the GPU.

Three parts:

* here, in this process: when the backend may run and the reason it gives when it cannot;
* Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors): ``import torch``
  already imports Triton in this process and the variable is read when acmix
  defines its kernels, so :mod:`tests.ops.triton_interpreter_cases` runs in a
  fresh ``pytest`` subprocess with it set (a representative subset by default,
  the whole sweep under ``slow``);
* on a CUDA GPU (marker ``gpu``): the sweep at real shapes in float32, float16
  and bfloat16 against the float64 reference, and a whole model's parity.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from acmix import ops
from acmix.ops import BACKENDS, OP_BACKENDS, BackendError, choose_backend, triton_backend
from tests.conftest import requires_cuda
from tests.ops.triton_interpreter_cases import check_case

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).resolve().with_name("triton_interpreter_cases.py")
f64 = torch.float64


def test_triton_is_the_local_attentions_gpu_backend() -> None:
    assert "triton" in BACKENDS
    assert OP_BACKENDS["local_attention"] == ("cpp", "triton", "shift", "reference")
    assert all("triton" not in b for op, b in OP_BACKENDS.items() if op != "local_attention")


def test_unavailable_says_why(monkeypatch) -> None:
    x = torch.randn(1, 1, 4, 5, 5)
    why = triton_backend.unavailable
    assert why("conv_path", (x,), {}) == "no Triton kernel for conv_path"
    assert "dot-product attention weights only" in why("local_attention", (x,), {"weight": "mlp"})
    monkeypatch.setattr(triton_backend, "_kernels", None)
    assert why("local_attention", (x,), {}) == "Triton is not installed"
    monkeypatch.undo()
    if triton_backend._kernels is None:
        pytest.skip("Triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)" in why(
        "local_attention", (x,), {}
    )
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_backend, "_INTERPRETED", False)
    assert "set it before" in why("local_attention", (x,), {})
    monkeypatch.setattr(triton_backend, "_INTERPRETED", True)
    assert why("local_attention", (x,), {}) is None
    assert why("local_attention", (x.half(),), {}) is None
    assert why("local_attention", (x.double(),), {}) == (
        "float64 is not supported; use cpp/shift/reference"
    )
    assert "needs float32 / float16 / bfloat16" in why("local_attention", (x.int(),), {})


@pytest.mark.skipif(triton_backend.interpreted(), reason="this process runs the interpreter")
def test_cpu_tensors_never_choose_triton() -> None:
    x = torch.randn(1, 1, 4, 5, 5, dtype=torch.float16)
    assert choose_backend("local_attention", (x,), "auto") == "shift"
    with pytest.raises(BackendError, match=r"backend='triton' cannot run here.*TRITON_INTERPRET"):
        ops.local_attention(x, x, x, 3, backend="triton")


def test_tracing_keeps_aten_ops() -> None:
    q = torch.randn(1, 1, 2, 5, 5)

    def f(q):
        assert "torch.jit tracing" in triton_backend.unavailable("local_attention", (q,), {})
        return q

    torch.jit.trace(f, (q,), check_trace=False)


# ----------------------------------------------------------------------------------------
# Triton's interpreter, in a subprocess
# ----------------------------------------------------------------------------------------


def _run_interpreter_cases(marker: str) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker, str(CASES)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"interpreter cases failed ({' '.join(cmd)}):\n{tail}"
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail


@pytest.mark.slow  # ~1 min of interpreter: out of the quick `-m "not slow"` subset
def test_interpreter_matches_reference() -> None:
    """The quick subset: every shape feature, both dtypes, opcheck, compile, determinism."""
    _run_interpreter_cases("not slow")


@pytest.mark.slow
def test_interpreter_sweep() -> None:
    """Sizes x kernels 3-7 x strides 1-2 x both paddings, head dims 8-64, pe on and off."""
    _run_interpreter_cases("slow")


# ----------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 1e-2, "atol": 1e-2},
    torch.bfloat16: {"rtol": 5e-2, "atol": 5e-2},
}
# (B, N, d, H, W, kernel, stride, padding, pe)
GPU_CASES = [
    (2, 4, 16, 56, 56, 7, 1, "reflect", True),
    (2, 4, 32, 28, 27, 7, 2, "zeros", True),
    (4, 8, 8, 14, 14, 3, 1, "zeros", False),
    (2, 2, 24, 23, 29, 5, 2, "reflect", False),
    (1, 2, 64, 31, 17, 13, 1, "zeros", True),
    (2, 4, 16, 9, 11, 13, 2, "zeros", True),
    (1, 2, 128, 15, 16, 5, 1, "reflect", True),
]


def _gpu_available() -> None:
    x = torch.zeros(1, device="cuda")
    why = triton_backend.unavailable("local_attention", (x,), {})
    if why:
        pytest.skip(why)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_matches_float64_reference(case, dtype) -> None:
    """(gradcheck needs float64, which the kernels do not take: the float64 reference instead.)"""
    _gpu_available()
    B, N, d, H, W = case[:5]
    sample = torch.zeros(B, N, d, H, W, dtype=dtype, device="cuda")
    assert choose_backend("local_attention", (sample,), "auto") == "triton"
    check_case(case, dtype, device="cuda", tol=GPU_TOL)


@requires_cuda
@pytest.mark.gpu
def test_gpu_backward_is_deterministic() -> None:
    _gpu_available()
    q, k, v = (torch.randn(4, 4, 32, 28, 28, device="cuda", requires_grad=True) for _ in range(3))
    out = ops.local_attention(q, k, v, 7, 1, "reflect", backend="triton")
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@requires_cuda
@pytest.mark.gpu
def test_gpu_compile_fullgraph() -> None:
    _gpu_available()
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 4, 16, 28, 28, device="cuda", requires_grad=True) for _ in range(3))
    pe = torch.randn(16, 28, 28, device="cuda", requires_grad=True)

    def f(q, k, v, pe):
        return ops.local_attention(q, k, v, 7, 1, "zeros", pe)

    compiled = torch.compile(f, fullgraph=True)
    got, want = compiled(q, k, v, pe), f(q, k, v, pe)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), (q, k, v, pe))
    g_want = torch.autograd.grad(want.square().sum(), (q, k, v, pe))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@requires_cuda
@pytest.mark.gpu
def test_gpu_model_parity() -> None:
    """``acmix_resnet26`` at 64 x 64 on CUDA: ``"auto"`` (Triton attention) vs ``"reference"``."""
    _gpu_available()
    import timm

    import acmix  # noqa: F401  (registers the models)

    model = timm.create_model("acmix_resnet26", num_classes=10).cuda().eval()
    ref_model = copy.deepcopy(model)
    for m in ref_model.modules():
        if hasattr(m, "backend"):
            m.backend = "reference"
    x = torch.randn(2, 3, 64, 64, device="cuda")
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare the attention, not cuDNN's TF32
    try:
        outs, grads = [], []
        for m in (model, ref_model):
            xi = x.clone().requires_grad_()
            counter = FlopCounterMode(display=False)
            with counter:
                out = m(xi)
            used = torch.ops.acmix.local_attention_triton in counter.get_flop_counts()["Global"]
            assert used == (m is model)
            (gx,) = torch.autograd.grad(out.square().sum(), xi)
            outs.append(out)
            grads.append(gx)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    for a, b in ((outs[0], outs[1]), (grads[0], grads[1])):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a / scale, b / scale, rtol=1e-4, atol=1e-4)
