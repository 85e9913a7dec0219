"""Local attention: a per-pixel brute force (the truth), the reference and the shift backend."""

from __future__ import annotations

import itertools

import pytest
import torch

from acmix.ops import local_attention, local_attention_reference
from tests.conftest import max_abs


def _reflect(i: int, n: int) -> int:
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def brute_force(q, k, v, kernel, stride, padding, pe=None):
    """One query at a time, straight from the formula (float64, tiny inputs only)."""
    B, N, d, H, W = q.shape
    r = kernel // 2
    Ho, Wo = -(-H // stride), -(-W // stride)
    out = torch.zeros(B, N, d, Ho, Wo, dtype=q.dtype)
    pe = torch.zeros(d, H, W, dtype=q.dtype) if pe is None else pe.reshape(d, H, W)
    for b, n, i, j in itertools.product(range(B), range(N), range(Ho), range(Wo)):
        ci, cj = i * stride, j * stride
        qc = q[b, n, :, ci, cj] * d**-0.5
        logits, values = [], []
        for dy, dx in itertools.product(range(-r, r + 1), repeat=2):
            y, x = ci + dy, cj + dx
            if padding == "zeros" and not (0 <= y < H and 0 <= x < W):
                continue  # out-of-image keys are excluded
            y, x = _reflect(y, H), _reflect(x, W)  # duplicates count twice
            key = k[b, n, :, y, x] + pe[:, ci, cj] - pe[:, y, x]
            logits.append(qc @ key)
            values.append(v[b, n, :, y, x])
        a = torch.softmax(torch.stack(logits), 0)
        out[b, n, :, i, j] = (a[:, None] * torch.stack(values)).sum(0)
    return out


def _qkv(shape, dtype=torch.float64, grad=False):
    return [torch.randn(*shape, dtype=dtype, requires_grad=grad) for _ in range(3)]


@pytest.mark.parametrize("padding", ["reflect", "zeros"])
@pytest.mark.parametrize(
    ("kernel", "stride", "hw"), [(3, 1, (5, 6)), (5, 2, (7, 6)), (3, 3, (7, 8))]
)
def test_reference_and_shift_equal_brute_force(padding, kernel, stride, hw) -> None:
    q, k, v = _qkv((2, 2, 3, *hw))
    pe = torch.randn(1, 3, *hw, dtype=torch.float64)
    truth = brute_force(q, k, v, kernel, stride, padding, pe)
    for backend in ("reference", "shift", "cpp"):
        out = local_attention(q, k, v, kernel, stride, padding, pe, backend=backend)
        assert out.shape == truth.shape
        assert max_abs(out, truth) < 1e-12, backend


SWEEP = [
    # (B, N, d, H, W, kernel, stride)
    (2, 4, 4, 14, 14, 7, 1),
    (1, 2, 8, 9, 11, 5, 1),
    (2, 1, 3, 15, 15, 7, 2),
    (1, 3, 2, 13, 14, 3, 2),
    (1, 2, 4, 10, 7, 3, 3),
    (1, 2, 4, 6, 6, 1, 1),
    (1, 1, 4, 2, 3, 5, 1),
    # several row blocks in the CPU kernel, channel tiles of 8 plus a remainder
    (1, 1, 12, 45, 30, 7, 1),
    (1, 1, 16, 50, 33, 7, 2),
]


# Reflection needs kernel // 2 < H, W; smaller maps are covered by test_errors.
SWEEP_PADDED = [
    (case, padding)
    for case in SWEEP
    for padding in ("reflect", "zeros")
    if padding == "zeros" or case[5] // 2 < min(case[3], case[4])
]


@pytest.mark.parametrize(("case", "padding"), SWEEP_PADDED)
@pytest.mark.parametrize("with_pe", [True, False])
@pytest.mark.parametrize("backend", ["shift", "cpp"])
def test_fast_backends_match_reference_fwd_bwd(case, padding, with_pe, backend) -> None:
    B, N, d, H, W, kernel, stride = case
    q, k, v = _qkv((B, N, d, H, W), grad=True)
    pe = torch.randn(1, d, H, W, dtype=torch.float64, requires_grad=True) if with_pe else None
    inputs = [q, k, v] + ([pe] if with_pe else [])
    ref = local_attention(q, k, v, kernel, stride, padding, pe, backend="reference")
    out = local_attention(q, k, v, kernel, stride, padding, pe, backend=backend)
    assert out.shape == (B, N, d, -(-H // stride), -(-W // stride))
    assert max_abs(out, ref) < 1e-12
    g = torch.randn_like(ref)
    gr = torch.autograd.grad((ref * g).sum(), inputs)
    go = torch.autograd.grad((out * g).sum(), inputs)
    for a, b in zip(go, gr, strict=True):
        assert max_abs(a, b) < 1e-11


@pytest.mark.parametrize("padding", ["reflect", "zeros"])
def test_mlp_weighting_shift_matches_reference(padding) -> None:
    B, N, d, H, W, kernel, stride, hidden = 1, 2, 3, 7, 6, 5, 2, 4
    q, k, v = _qkv((B, N, d, H, W), grad=True)
    pe = torch.randn(1, d, H, W, dtype=torch.float64, requires_grad=True)
    mlp = (
        torch.randn(hidden, 2 * d, dtype=torch.float64, requires_grad=True),
        torch.randn(hidden, dtype=torch.float64, requires_grad=True),
        torch.randn(hidden, dtype=torch.float64, requires_grad=True),
    )
    inputs = [q, k, v, pe, *mlp]
    ref = local_attention(q, k, v, kernel, stride, padding, pe, mlp=mlp, backend="reference")
    out = local_attention(q, k, v, kernel, stride, padding, pe, mlp=mlp, backend="shift")
    assert max_abs(out, ref) < 1e-12
    g = torch.randn_like(ref)
    for a, b in zip(
        torch.autograd.grad((out * g).sum(), inputs),
        torch.autograd.grad((ref * g).sum(), inputs),
        strict=True,
    ):
        assert max_abs(a, b) < 1e-11


def test_mlp_weighting_hand_case() -> None:
    """MLP logits w2 . relu(W1 [q; k] + b1), by hand for the centre of a 3x3 map."""
    d, hidden = 2, 3
    q, k, v = _qkv((1, 1, d, 3, 3))
    w1 = torch.randn(hidden, 2 * d, dtype=torch.float64)
    b1 = torch.randn(hidden, dtype=torch.float64)
    w2 = torch.randn(hidden, dtype=torch.float64)
    out = local_attention_reference(q, k, v, 3, 1, "zeros", mlp=(w1, b1, w2))
    # Centre pixel: all 9 neighbours are in the image.
    qc = q[0, 0, :, 1, 1]
    keys = k[0, 0].reshape(d, 9).T
    logits = torch.stack([w2 @ torch.relu(w1 @ torch.cat((qc, kk)) + b1) for kk in keys])
    expected = torch.softmax(logits, 0) @ v[0, 0].reshape(d, 9).T
    assert max_abs(out[0, 0, :, 1, 1], expected) < 1e-13


@pytest.mark.parametrize("backend", ["reference", "shift", "cpp"])
@pytest.mark.parametrize("padding", ["reflect", "zeros"])
def test_gradcheck(backend, padding) -> None:
    q, k, v = _qkv((1, 2, 2, 5, 4), grad=True)
    pe = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, pe):
        return local_attention(q, k, v, 3, 2, padding, pe, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v, pe))


def test_gradcheck_mlp() -> None:
    q, k, v = _qkv((1, 1, 2, 4, 4), grad=True)
    mlp = tuple(
        torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 4), (3,), (3,))
    )

    def fn(q, k, v, *mlp):
        return local_attention(q, k, v, 3, 1, "reflect", mlp=mlp, backend="shift")

    assert torch.autograd.gradcheck(fn, (q, k, v, *mlp))


def test_reflection_duplicates_count_twice() -> None:
    """At a corner, reflection makes some keys appear twice: the weights differ from masking."""
    q, k, v = _qkv((1, 1, 2, 4, 4))
    a = local_attention(q, k, v, 3, 1, "reflect")
    b = local_attention(q, k, v, 3, 1, "zeros")
    assert max_abs(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1]) < 1e-13  # interior identical
    assert max_abs(a[..., 0, 0], b[..., 0, 0]) > 1e-6  # corner differs


def test_cpp_float32_and_auto_selection() -> None:
    q, k, v = _qkv((2, 2, 4, 9, 10), dtype=torch.float32)
    ref = local_attention(q, k, v, 5, 2, backend="reference")
    for backend in ("cpp", "auto"):
        assert max_abs(local_attention(q, k, v, 5, 2, backend=backend), ref) < 1e-5
    with pytest.raises(ValueError, match="backend='cpp' cannot run here.*needs float32 / float64"):
        local_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 5, backend="cpp")
    # auto falls back to the PyTorch shift path where the kernel does not apply
    out = local_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 5, backend="auto")
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("padding", ["reflect", "zeros"])
def test_cpp_float32_fwd_bwd_match_float64_reference(padding) -> None:
    # float32 uses the kernel's vectorised exp: it must stay within float32 rounding.
    q, k, v = _qkv((2, 2, 16, 40, 23), grad=True)
    pe = torch.randn(1, 16, 40, 23, dtype=torch.float64, requires_grad=True)
    inputs = [q, k, v, pe]
    ref = local_attention(q, k, v, 7, 1, padding, pe, backend="reference")
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad((ref * g).sum(), inputs)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs]
    out = local_attention(*inputs32[:3], 7, 1, padding, inputs32[3], backend="cpp")
    grads = torch.autograd.grad((out * g.float()).sum(), inputs32)
    assert max_abs(out.double(), ref) < 2e-6
    for a, b in zip(grads, grads_ref, strict=True):
        assert max_abs(a.double(), b) < 2e-5 * b.abs().max().item()


def test_cpp_disabled_by_environment(monkeypatch) -> None:
    from acmix.ops import cpp

    monkeypatch.setenv("ACMIX_NO_CPP", "1")
    monkeypatch.setattr(cpp, "_state", {})  # restored afterwards: later tests load it again
    with pytest.warns(RuntimeWarning, match="ACMIX_NO_CPP is set"):
        assert cpp.kernel("attention") is None
    q, k, v = _qkv((1, 1, 2, 5, 5))
    ref = local_attention(q, k, v, 3, backend="reference")
    assert max_abs(local_attention(q, k, v, 3, backend="auto"), ref) < 1e-12
    with pytest.raises(RuntimeError, match="not built"):
        local_attention(q, k, v, 3, backend="cpp")


def test_errors() -> None:
    q, k, v = _qkv((1, 1, 2, 3, 3))
    with pytest.raises(ValueError, match="too small for reflection.*zeros"):
        local_attention(q, k, v, 7)
    with pytest.raises(ValueError, match="odd"):
        local_attention(q, k, v, 4)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        local_attention(q, k, v, 3, 0)
    with pytest.raises(ValueError, match="one shape"):
        local_attention(q, k[..., :2], v, 3)
    with pytest.raises(ValueError, match="backend"):
        local_attention(q, k, v, 3, backend="cuda")
    out = local_attention(q, k, v, 7, padding="zeros")  # the masked mode works on tiny maps
    assert torch.isfinite(out).all()
