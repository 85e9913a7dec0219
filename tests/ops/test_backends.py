"""Every (op, backend) pair against the reference backend, forward and backward; the choice itself.

One table drives the sweep: for each op a few small cases (odd sizes, strides,
both paddings, with and without the optional inputs), each run by every
backend the op implements and compared with ``"reference"`` on the outputs and
on the gradients of every floating input, in float64 and float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

from acmix import ops
from acmix.ops import OP_BACKENDS, BackendError, choose_backend, explain_backend

TOL = {torch.float64: {"rtol": 1e-9, "atol": 1e-9}, torch.float32: {"rtol": 2e-4, "atol": 2e-4}}

Case = Callable[[torch.dtype], tuple[list[torch.Tensor], Callable[..., torch.Tensor]]]


def _t(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def _local_attention(B, N, d, H, W, kernel, stride, padding, with_pe) -> Case:
    def make(dtype):
        q, k, v = (_t(B, N, d, H, W, dtype=dtype) for _ in range(3))
        pe = _t(d, H, W, dtype=dtype) if with_pe else None
        inputs = [q, k, v] + ([pe] if with_pe else [])

        def run(backend):
            return ops.local_attention(q, k, v, kernel, stride, padding, pe, backend=backend)

        return inputs, run

    return make


def _conv_path(B, N, d, H, W, kernel, stride, per_group, bias, channels_last) -> Case:
    def make(dtype):
        if channels_last:
            base = _t(B, H, W, 3 * N, d, dtype=dtype)
            qkv = base.permute(0, 3, 4, 1, 2)
        else:
            base = qkv = _t(B, 3 * N, d, H, W, dtype=dtype)
        fc_w = _t(kernel * kernel, 3 * N, dtype=dtype)
        fc_b = _t(kernel * kernel, dtype=dtype) if bias else None
        dep = _t(per_group * d, kernel * kernel, kernel, kernel, dtype=dtype)
        inputs = [base, fc_w, dep] + ([fc_b] if bias else [])

        def run(backend):
            C = per_group * d
            return ops.conv_path(qkv, fc_w, fc_b, dep, kernel, C, stride, backend=backend)

        return inputs, run

    return make


def _stage2(B, N, d, H, W, kernel_att, stride, padding) -> Case:
    def make(dtype):
        C = N * d
        qkv = _t(B, 3 * C, H, W, dtype=dtype)
        pe = _t(1, d, H, W, dtype=dtype)
        fc_w, dep = _t(9, 3 * N, dtype=dtype), _t(C, 9, 3, 3, dtype=dtype)
        r1, r2 = _t(1, dtype=dtype), _t(1, dtype=dtype)
        inputs = [qkv, pe, fc_w, dep, r1, r2]

        def run(backend):
            args = (qkv, N, kernel_att, padding, pe, fc_w, None, dep, 3, r1, r2, stride)
            return ops.acmix_stage2(*args, backend=backend)

        return inputs, run

    return make


def _window_attention(B, N, L, Lk, d, with_bias) -> Case:
    def make(dtype):
        q, k, v = (
            _t(B, N, L, d, dtype=dtype),
            _t(B, N, Lk, d, dtype=dtype),
            _t(B, N, Lk, d, dtype=dtype),
        )
        bias = _t(1, N, L, Lk, dtype=dtype) if with_bias else None
        inputs = [q, k, v] + ([bias] if with_bias else [])

        def run(backend):
            return ops.window_attention(q, k, v, bias, d**-0.5, backend=backend)

        return inputs, run

    return make


def _patchwise(B, C, G, H, W, kernel, padding) -> Case:
    def make(dtype):
        x, w = _t(B, C, H, W, dtype=dtype), _t(B, G, kernel * kernel, H, W, dtype=dtype)

        def run(backend):
            return ops.patchwise_aggregate(x, w, kernel, padding, backend)

        return [x, w], run

    return make


def _shift_sum(B, G, H, W, kernel, stride, repeat) -> Case:
    def make(dtype):
        x = _t(B, G, kernel * kernel, H, W, dtype=dtype)
        return [x], lambda backend: ops.shift_sum(x, kernel, stride, repeat, backend)

    return make


CASES: dict[str, list[tuple[str, Case]]] = {
    "local_attention": [
        ("7x9 k3 s1 reflect pe", _local_attention(2, 2, 4, 7, 9, 3, 1, "reflect", True)),
        ("9x6 k5 s2 zeros", _local_attention(1, 3, 8, 9, 6, 5, 2, "zeros", False)),
        ("5x11 k7 s3 zeros pe", _local_attention(1, 1, 16, 5, 11, 7, 3, "zeros", True)),
    ],
    "conv_path": [
        ("NCHW k3 s1 bias", _conv_path(2, 2, 4, 7, 9, 3, 1, 2, True, False)),
        ("NCHW k5 s2", _conv_path(1, 3, 5, 9, 6, 5, 2, 1, False, False)),
        ("channels-last k3 bias", _conv_path(1, 2, 8, 6, 7, 3, 1, 3, True, True)),
    ],
    "acmix_stage2": [
        ("k5 s1 reflect", _stage2(2, 2, 4, 7, 9, 5, 1, "reflect")),
        ("k3 s2 zeros", _stage2(1, 4, 2, 9, 6, 3, 2, "zeros")),
    ],
    "window_attention": [
        ("49 tokens, bias", _window_attention(3, 2, 49, 49, 8, True)),
        ("SRA 20 -> 5 tokens", _window_attention(2, 1, 20, 5, 16, False)),
    ],
    "patchwise_aggregate": [
        ("k3 reflect", _patchwise(2, 8, 2, 6, 7, 3, "reflect")),
        ("k5 zeros", _patchwise(1, 6, 3, 5, 9, 5, "zeros")),
    ],
    "shift_sum": [
        ("k3 s1", _shift_sum(2, 3, 6, 7, 3, 1, 1)),
        ("k5 s2 repeat 2", _shift_sum(1, 2, 9, 6, 5, 2, 2)),
    ],
}

# "triton" runs on CUDA, or on CPU only under Triton's interpreter, which must be
# switched on before acmix is imported: tests/ops/test_triton.py tests it (a subprocess).
UNTESTED_HERE = ("reference", "composed", "triton")

PAIRS = [
    (op, backend, label, case)
    for op, cases in CASES.items()
    for backend in OP_BACKENDS[op]
    if backend not in UNTESTED_HERE
    for label, case in cases
]


def test_every_op_has_cases_and_every_backend_is_tested() -> None:
    assert set(CASES) == set(OP_BACKENDS)
    tested = {(op, b) for op, b, _, _ in PAIRS}
    for op, backends in OP_BACKENDS.items():
        for b in backends:
            assert b in UNTESTED_HERE or (op, b) in tested


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    ("op", "backend", "label", "case"), PAIRS, ids=[f"{p[0]}-{p[1]}-{p[2]}" for p in PAIRS]
)
def test_backend_matches_reference_fwd_bwd(op, backend, label, case, dtype) -> None:
    inputs, run = case(dtype)
    # The reference in float64 is the truth for both dtypes.
    inputs64 = [t.detach().double() for t in inputs]
    assert choose_backend(op, inputs, backend) == backend  # it really runs here
    out = run(backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), inputs)
    # rebuild the reference on the same values
    ref_inputs, ref_run = _same_values(case, inputs64)
    ref = ref_run("reference")
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), ref_inputs)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    for a, b in zip(grads, ref_grads, strict=True):
        scale = max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.double() / scale, b / scale, **TOL[dtype])


def _same_values(case: Case, values: list[torch.Tensor]):
    """The case's inputs in float64 holding ``values`` (same layout, fresh leaves)."""
    inputs, run = case(torch.float64)
    with torch.no_grad():
        for t, v in zip(inputs, values, strict=True):
            t.copy_(v)
    return inputs, run


# ----------------------------------------------------------------------------------------
# The choice
# ----------------------------------------------------------------------------------------


def test_choice_explains_itself(caplog) -> None:
    x = torch.randn(1, 6, 2, 5, 5, dtype=torch.bfloat16)
    name, reasons = explain_backend("conv_path", (x,), "auto", stride=1)
    assert name == "reference"
    assert "needs float32 / float64" in reasons["cpp"]
    with caplog.at_level(logging.DEBUG, logger="acmix.ops"):
        choose_backend("conv_path", (x,), "auto")
    assert "conv_path: reference" in caplog.text and "cpp (needs float32" in caplog.text


def test_requested_backend_that_cannot_run_raises_with_the_reason() -> None:
    qkv = torch.randn(1, 6, 2, 5, 5).permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    with pytest.raises(
        BackendError, match="backend='cpp' cannot run here.*channels-last at stride 1"
    ):
        choose_backend("conv_path", (qkv,), "cpp", stride=2)
    q = torch.randn(1, 1, 2, 5, 5)
    mlp = (torch.randn(3, 4), torch.randn(3), torch.randn(3))
    with pytest.raises(BackendError, match="dot-product attention weights only"):
        ops.local_attention(q, q, q, 3, mlp=mlp, backend="cpp")
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("conv_path", (qkv,), "cuda")
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        choose_backend("conv", (qkv,))


def test_backend_an_op_lacks_chooses_as_auto() -> None:
    qkv = torch.randn(1, 6, 2, 5, 5)
    name, reasons = explain_backend("conv_path", (qkv,), "sdpa")
    assert name == choose_backend("conv_path", (qkv,), "auto")
    assert "no 'sdpa' implementation" in reasons["sdpa"]


def test_tracing_keeps_aten_ops() -> None:
    q = torch.randn(1, 1, 2, 5, 5)

    def f(q):
        assert choose_backend("local_attention", (q,), "auto") == "shift"
        return ops.local_attention(q, q, q, 3)

    torch.jit.trace(f, (q,), check_trace=False)


# ----------------------------------------------------------------------------------------
# Double backward: the reference supports it, the fast backends refuse it
# ----------------------------------------------------------------------------------------


def test_reference_is_twice_differentiable() -> None:
    q, k, v = (
        torch.randn(1, 1, 2, 4, 5, dtype=torch.float64, requires_grad=True) for _ in range(3)
    )
    assert torch.autograd.gradgradcheck(
        lambda q, k, v: ops.local_attention(q, k, v, 3, backend="reference"), (q, k, v)
    )


@pytest.mark.parametrize(
    ("op", "backend"),
    [
        ("local_attention", "cpp"),
        ("local_attention", "shift"),
        ("conv_path", "cpp"),
        ("acmix_stage2", "cpp"),
        ("patchwise_aggregate", "shift"),
    ],
)
def test_fast_backend_refuses_double_backward(op, backend) -> None:
    inputs, run = CASES[op][0][1](torch.float64)
    out = run(backend)
    (g,) = torch.autograd.grad(out.square().sum(), inputs[:1], create_graph=False)
    assert g is not None  # first order fine
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        torch.autograd.grad(run(backend).square().sum(), inputs[:1], create_graph=True)
