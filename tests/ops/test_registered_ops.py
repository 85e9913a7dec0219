"""The C++ kernels as registered ops: opcheck, one op per kernel for FlopCounterMode,
torch.compile(fullgraph=True) and torch.export."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck
from torch.utils.flop_counter import FlopCounterMode

from acmix import ACmix, WindowACmix
from acmix.analysis import count_macs
from acmix.ops import cpp

pytestmark = pytest.mark.skipif(
    not (cpp.kernel_built("attention") and cpp.kernel_built("conv_path")),
    reason="the C++ kernels are not built here",
)

f64 = torch.float64


def _t(*shape: int, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, dtype=f64, requires_grad=grad)


def _op_cases() -> list[tuple[str, object, tuple]]:
    B, N, d, H, W = 1, 2, 4, 6, 7
    qkv, pe = _t(B, 3 * N * d, H, W), _t(d, H, W)
    fc, fb, dep = _t(9, 3 * N), _t(9), _t(N * d, 9, 3, 3)
    r1, r2 = _t(1), _t(1)
    cl = _t(B, H, W, 3 * N * d)
    acmix = torch.ops.acmix
    g_att = torch.randn(B, N * d, H, W, dtype=f64)
    g_att2 = torch.randn(B, N * d, 3, 4, dtype=f64)
    _, lse = acmix.local_attention_cpu(qkv, pe, N, 3, False, 0.5, 1)
    _, lse2 = acmix.local_attention_cpu(qkv, None, N, 3, True, 0.5, 2)
    nog = [t.detach() for t in (qkv, pe, fc, fb, dep, r1, r2, cl)]
    qkv_, pe_, fc_, fb_, dep_, r1_, r2_, cl_ = nog
    return [
        ("attention", acmix.local_attention_cpu.default, (qkv, pe, N, 3, False, 0.5, 1)),
        ("attention s2 zeros", acmix.local_attention_cpu.default, (qkv, None, N, 3, True, 0.5, 2)),
        (
            "attention backward",
            acmix.local_attention_cpu_backward.default,
            (g_att2, qkv_, None, lse2.detach(), N, 3, True, 0.5, 2),
        ),
        ("conv path", acmix.conv_path_cpu.default, (qkv, fc, fb, dep, 2)),
        (
            "conv path backward",
            acmix.conv_path_cpu_backward.default,
            (g_att, qkv_, fc_, None, dep_, 1),
        ),
        ("conv path channels-last", acmix.conv_path_cl_cpu.default, (cl, fc, None, dep)),
        (
            "conv path channels-last backward",
            acmix.conv_path_cl_cpu_backward.default,
            (g_att.permute(0, 2, 3, 1).contiguous(), cl_, fc_, fb_, dep_),
        ),
        (
            "stage II",
            acmix.acmix_stage2_cpu.default,
            (qkv, pe, fc, None, dep, r1, r2, N, 3, False, 0.5, 1),
        ),
        (
            "stage II backward",
            acmix.acmix_stage2_cpu_backward.default,
            (g_att, qkv_, pe_, lse.detach(), fc_, fb_, dep_, r1_, r2_, N, 3, False, 0.5, 1),
        ),
    ]


@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0] if isinstance(c, tuple) else "")
def test_opcheck(case) -> None:
    _, op, args = case
    opcheck(op, args)


def test_counter_sees_one_op_per_kernel() -> None:
    layer = ACmix(16, 16, kernel_att=5, head=4).eval()
    x = torch.randn(2, 16, 12, 12)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        layer(x)
    ops = counter.get_flop_counts()["Global"]
    assert ops[torch.ops.acmix.acmix_stage2_cpu] == 2 * (
        2 * 25 * 16 * 144 * 2 + 2 * (4 * 9 * 12 * 144 + 16 * 81 * 144)
    )


@pytest.mark.parametrize("backend", ["shift", "reference"])
def test_counted_macs_do_not_depend_on_the_backend(backend) -> None:
    x = torch.randn(1, 32, 14, 14)
    layer = ACmix(32, 32, kernel_att=7, head=4).eval()
    auto = count_macs(layer, x).total
    layer.backend = backend
    assert count_macs(layer, x).total == auto
    win = WindowACmix(32, 7, 4).eval()
    y = torch.randn(1, 14, 14, 32)
    auto = count_macs(win, y).total
    win.backend = "reference"
    assert count_macs(win, y).total == auto


def _fwd_bwd(fn, x):
    x = x.detach().requires_grad_()
    out = fn(x)
    (g,) = torch.autograd.grad(out.square().sum(), x)
    return out.detach(), g


@pytest.mark.parametrize("stride", [1, 2])
def test_compile_fullgraph_matches_eager(stride) -> None:
    torch._dynamo.reset()
    layer = ACmix(16, 16, kernel_att=5, head=4, stride=stride).double()
    x = torch.randn(2, 16, 11, 10, dtype=f64)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    eager = _fwd_bwd(layer, x)
    got = _fwd_bwd(compiled, x)
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_export_sees_one_op() -> None:
    layer = ACmix(8, 8, kernel_att=3, head=2).eval()
    ep = torch.export.export(layer, (torch.randn(1, 8, 9, 9),))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "acmix.acmix_stage2_cpu.default" in targets
    assert not any("unfold" in t or "softmax" in t for t in targets)
