"""The Triton backend under Triton's interpreter, on CPU tensors (run by ``test_triton.py``).

``TRITON_INTERPRET=1`` must be set before :mod:`acmix` defines its kernels,
and ``import torch`` already imports Triton in a pytest process, so this file
is not collected by default (its name does not match ``test_*.py``):
``tests/ops/test_triton.py`` runs it in a fresh ``pytest`` subprocess with the
variable set. By hand::

    TRITON_INTERPRET=1 .venv/bin/pytest tests/ops/triton_interpreter_cases.py

Every case runs forward and backward (the gradients of q, k, v and pe) in
float32 and float16 (the interpreter has no bfloat16) against the reference in
float64 on the same rounded values.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.library import opcheck
from torch.utils.flop_counter import FlopCounterMode

from acmix import ops
from acmix.ops import choose_backend, explain_backend, triton_backend

pytestmark = pytest.mark.skipif(
    not triton_backend.interpreted() or os.environ.get("TRITON_INTERPRET") != "1",
    reason="needs TRITON_INTERPRET=1 set before acmix is imported (run by test_triton.py)",
)

f64 = torch.float64
DTYPES = [torch.float32, torch.float16]
# On max(1, |truth|)-scaled values: float16 rounds the inputs, P and dS for its dots and
# the outputs (one ulp is 1e-3 at 1); float32 dots are IEEE in the interpreter.
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float16: {"rtol": 1e-2, "atol": 1e-2}}

# (B, N, d, H, W, kernel, stride, padding, pe)
QUICK = [
    (1, 2, 8, 5, 7, 3, 1, "reflect", True),
    (2, 1, 16, 9, 6, 5, 2, "zeros", True),
    (1, 2, 24, 3, 3, 5, 1, "zeros", False),  # map smaller than the window; d padded to 32
    (1, 1, 64, 7, 5, 7, 2, "reflect", True),
    (1, 2, 8, 6, 9, 7, 1, "zeros", True),
    (1, 1, 16, 5, 7, 3, 2, "zeros", False),
    (2, 2, 24, 9, 6, 5, 1, "reflect", False),
    (1, 1, 8, 6, 5, 13, 1, "zeros", True),  # kernel 13 on a map smaller than the window
    (1, 1, 16, 8, 9, 13, 2, "reflect", True),
    (1, 1, 4, 4, 6, 1, 1, "reflect", False),  # kernel 1: out = v
    (1, 1, 3, 7, 7, 3, 3, "zeros", True),  # stride 3, d = 3
]


def _full_sweep() -> list[tuple]:
    """Sizes x kernels x strides x paddings, cycling the head dims and pe."""
    cases, n = [], 0
    for H, W in ((5, 7), (9, 6), (3, 3)):
        for kernel in (3, 5, 7):
            for stride in (1, 2):
                for padding in ("reflect", "zeros"):
                    if padding == "reflect" and kernel // 2 >= min(H, W):
                        continue
                    d = (8, 16, 24, 64)[n % 4]
                    cases.append(
                        (1 + n % 2, 2 - n % 2, d, H, W, kernel, stride, padding, n % 3 > 0)
                    )
                    n += 1
    return [c for c in cases if c not in QUICK]


def _label(c: tuple) -> str:
    B, N, d, H, W, k, s, padding, pe = c
    return f"B{B}N{N}d{d}-{H}x{W}-k{k}s{s}-{padding}" + ("-pe" if pe else "")


def check_case(
    case: tuple,
    dtype: torch.dtype,
    qkv_entry: bool = False,
    device: str | torch.device = "cpu",
    tol: dict | None = None,
) -> None:
    """One case through ``backend="triton"`` against the float64 reference, fwd and bwd.

    Also used by ``test_triton.py``'s GPU tests (``device="cuda"``, their tolerances).
    """
    B, N, d, H, W, kernel, stride, padding, with_pe = case
    tol = TOL if tol is None else tol
    truth = [torch.randn(B, N, d, H, W, dtype=f64, device=device) for _ in range(3)]
    if with_pe:
        truth.append(torch.randn(1, d, H, W, dtype=f64, device=device))
    low = [t.to(dtype).requires_grad_() for t in truth]
    ref_in = [t.detach().double().requires_grad_() for t in low]  # the same rounded values
    pe, pe_ref = (low[3], ref_in[3]) if with_pe else (None, None)
    if qkv_entry:
        qkv = torch.cat(low[:3], dim=1).reshape(B, 3 * N * d, H, W)
        out = ops.local_attention_qkv(qkv, N, kernel, stride, padding, pe, backend="triton")
        out = out.view(B, N, d, out.shape[-2], out.shape[-1])
    else:
        out = ops.local_attention(*low[:3], kernel, stride, padding, pe, backend="triton")
    assert out.dtype == dtype
    ref = ops.local_attention(*ref_in[:3], kernel, stride, padding, pe_ref, backend="reference")
    g = torch.randn_like(ref).to(dtype)
    grads = torch.autograd.grad(out, low, g)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    names = ["out", "dq", "dk", "dv", "dpe"][: 1 + len(grads)]
    for name, a, b in zip(names, (out, *grads), (ref, *ref_grads), strict=True):
        assert a.dtype == dtype, name
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(
            a.double() / scale, b / scale, **tol[dtype], msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("case", QUICK, ids=_label)
def test_matches_reference(case, dtype) -> None:
    check_case(case, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
@pytest.mark.parametrize("case", _full_sweep(), ids=_label)
def test_matches_reference_sweep(case, dtype) -> None:
    check_case(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f16"])
def test_fused_projection_entry(dtype) -> None:
    check_case((1, 2, 8, 7, 6, 5, 2, "zeros", True), dtype, qkv_entry=True)


def test_choice_under_the_interpreter() -> None:
    half = torch.randn(1, 1, 4, 5, 5, dtype=torch.float16)
    assert choose_backend("local_attention", (half,), "auto") == "triton"
    assert choose_backend("local_attention", (half.float(),), "triton") == "triton"
    name, reasons = explain_backend("local_attention", (half.double(),), "triton")
    assert name is None
    assert "float64 is not supported; use cpp/shift/reference" in reasons["triton"]
    _, reasons = explain_backend("local_attention", (half,), "auto", weight="mlp")
    assert "dot-product attention weights only" in reasons["triton"]


def _prepared(dtype=torch.float32, grad=True):
    BN, d, H, W, kernel, stride = 2, 8, 5, 6, 3, 2
    Ho, Wo = (H + 1) // 2, (W + 1) // 2
    q = torch.randn(BN, Ho, Wo, d, dtype=dtype, requires_grad=grad)
    k = torch.randn(BN, H + 2, W + 2, d, dtype=dtype, requires_grad=grad)
    v = torch.randn(BN, H + 2, W + 2, d, dtype=dtype, requires_grad=grad)
    return q, k, v, kernel, stride, H, W


@pytest.mark.parametrize("zeros", [False, True], ids=["reflect", "zeros"])
def test_opcheck(zeros) -> None:
    q, k, v, kernel, stride, H, W = _prepared()
    opcheck(torch.ops.acmix.local_attention_triton.default, (q, k, v, kernel, stride, zeros, H, W))
    out, lse = torch.ops.acmix.local_attention_triton(q, k, v, kernel, stride, zeros, H, W)
    args = [t.detach() for t in (torch.randn_like(out), q, k, v, out, lse)]
    opcheck(
        torch.ops.acmix.local_attention_triton_backward.default,
        (*args, kernel, stride, zeros, H, W),
    )


def test_backward_is_deterministic() -> None:
    q, k, v, kernel, stride, H, W = _prepared()
    out, _ = torch.ops.acmix.local_attention_triton(q, k, v, kernel, stride, True, H, W)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_double_backward_is_refused() -> None:
    q, k, v = (torch.randn(1, 1, 4, 5, 5, requires_grad=True) for _ in range(3))
    out = ops.local_attention(q, k, v, 3, backend="triton")
    with pytest.raises(RuntimeError, match=r"local_attention \(triton\).*backend='reference'"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_flop_counter_counts_the_op() -> None:
    B, N, d, H, W, kernel, stride = 2, 2, 8, 7, 6, 5, 2
    q, k, v = (torch.randn(B, N, d, H, W) for _ in range(3))
    counter = FlopCounterMode(display=False)
    with counter:
        ops.local_attention(q, k, v, kernel, stride, "zeros", backend="triton")
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.acmix.local_attention_triton] == 2 * 2 * 25 * d * B * N * 4 * 3


def test_compile_fullgraph_sees_one_op() -> None:
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 8, 6, 7, requires_grad=True) for _ in range(3))
    pe = torch.randn(8, 6, 7, requires_grad=True)

    def f(q, k, v, pe):
        return ops.local_attention(q, k, v, 3, 1, "reflect", pe, backend="triton")

    explanation = torch._dynamo.explain(f)(q, k, v, pe)
    assert explanation.graph_break_count == 0
    targets = {str(n.target) for g in explanation.graphs for n in g.graph.nodes}
    assert any("local_attention_triton" in t for t in targets), targets
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got, want = compiled(q, k, v, pe), f(q, k, v, pe)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    g_got = torch.autograd.grad(got.square().sum(), (q, k, v, pe))
    g_want = torch.autograd.grad(want.square().sum(), (q, k, v, pe))
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
