"""Windowed (Swin) ACmix: parity with the authors' fixtures, window ops, errors."""

from __future__ import annotations

import pytest
import torch

from acmix.layers import (
    WindowACmix,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)
from acmix.ops import choose_backend
from tests.conftest import load_fixture, max_abs, rel_err

CASES = ["05a_swin_window_attention", "05b_swin_window_attention_mask"]


def _run(fx: dict, dtype: torch.dtype, backend: str):
    m = WindowACmix(**fx["config"], backend=backend).to(dtype).eval()
    m.load_state_dict(fx["state_dict"])  # the authors' keys, strict
    x = fx["input"].to(dtype).requires_grad_(True)
    mask = fx["mask"].to(dtype) if fx["mask"] is not None else None
    assert fx["forward_args"] == {"H": x.shape[1], "W": x.shape[2]}
    y = m(x, mask)
    (y * fx["grad_output"].to(dtype)).sum().backward()
    return y, x.grad, {n: p.grad for n, p in m.named_parameters()}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_fixture_parity_float64(fixtures_dir, name, backend) -> None:
    fx = load_fixture(fixtures_dir, name)
    y, gx, grads = _run(fx, torch.float64, backend)
    assert max_abs(y, fx["output"]) <= 1e-9
    assert max_abs(gx, fx["grad_input"]) <= 1e-9
    assert set(fx["param_grads"]) == set(grads)
    for key, g in fx["param_grads"].items():
        assert max_abs(grads[key], g) <= 1e-9, key


@pytest.mark.parametrize("name", CASES)
def test_fixture_parity_float32(fixtures_dir, name) -> None:
    fx = load_fixture(fixtures_dir, name)
    y, gx, grads = _run(fx, torch.float32, "sdpa")
    assert rel_err(y, fx["output"]) <= 1e-4
    assert rel_err(gx, fx["grad_input"]) <= 1e-4
    for key, g in fx["param_grads"].items():
        assert rel_err(grads[key], g) <= 1e-4, key


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fixture_parity_inference(fixtures_dir, name, dtype) -> None:
    """Inference (no autograd graph) through the channels-last conv-path kernel."""
    fx = load_fixture(fixtures_dir, name)
    m = WindowACmix(**fx["config"]).to(dtype).eval()
    m.load_state_dict(fx["state_dict"])
    x = fx["input"].to(dtype)
    mask = fx["mask"].to(dtype) if fx["mask"] is not None else None
    heads = m.qkv(x).view(*x.shape[:3], 3 * m.num_heads, -1).permute(0, 3, 4, 1, 2)
    with torch.no_grad():
        assert choose_backend("conv_path", (heads,), "auto") == "cpp"
        y = m(x, mask)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert rel_err(y, fx["output"]) <= tol


def test_fixture_mask_equals_ours(fixtures_dir) -> None:
    fx = load_fixture(fixtures_dir, CASES[1])
    assert torch.equal(shifted_window_mask(14, 14, 7, 3).to(fx["mask"].dtype), fx["mask"])
    assert torch.equal(relative_position_index((7, 7)), fx["state_dict"]["relative_position_index"])


def test_window_partition_round_trip() -> None:
    x = torch.randn(2, 8, 12, 5)
    w = window_partition(x, (4, 3))
    assert w.shape == (2 * 2 * 4, 12, 5)
    assert torch.equal(w[0].view(4, 3, 5), x[0, :4, :3])
    assert torch.equal(window_reverse(w, (4, 3), 8, 12), x)
    with pytest.raises(ValueError, match="not a multiple of the window"):
        window_partition(torch.randn(1, 7, 7, 2), (4, 4))


def test_relative_position_index_hand_case() -> None:
    idx = relative_position_index((2, 2))
    # Token 0 = (0, 0), token 3 = (1, 1): offset (-1, -1) -> (0)*(3) + 0 = 0; self -> centre 4.
    assert idx[0, 3] == 0 and idx[3, 0] == 8 and idx.diagonal().eq(4).all()


def test_gradcheck_both_backends() -> None:
    for backend in ("sdpa", "reference"):
        m = WindowACmix(4, 2, 2, backend=backend).double()
        x = torch.randn(1, 4, 4, 4, dtype=torch.float64, requires_grad=True)
        mask = shifted_window_mask(4, 4, 2, 1).double()
        assert torch.autograd.gradcheck(lambda t, m=m, mask=mask: m(t, mask), (x,))


def test_attention_only_is_swin_window_attention() -> None:
    """paths='attn' is plain Swin window attention: softmax(q k^T / sqrt(d) + bias) v, proj."""
    m = WindowACmix(8, 2, 2, paths="attn").double()
    x = torch.randn(1, 2, 2, 8, dtype=torch.float64)  # one window of 4 tokens
    qkv = m.qkv(x.view(4, 8)).view(4, 3, 2, 4).permute(1, 2, 0, 3)  # (3, N, L, d)
    q, k, v = qkv
    attn = torch.softmax(q @ k.transpose(-1, -2) / 2.0 + m.position_bias(), -1)
    expected = m.proj((attn @ v).transpose(0, 1).reshape(4, 8)).view(1, 2, 2, 8)
    assert max_abs(m(x), expected) < 1e-13
    assert "fc.weight" not in m.state_dict()


def test_conv_only_has_no_attention_parameters() -> None:
    m = WindowACmix(8, 2, 2, paths="conv")
    assert {n.split(".")[0] for n in m.state_dict()} == {"qkv", "fc", "dep_conv"}
    x = torch.randn(1, 4, 4, 8)
    m(x).sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"out_planes \(30\) must be divisible by head \(4\)"):
        WindowACmix(30, 7, 4)
    m = WindowACmix(8, 2, 2)
    with pytest.raises(ValueError, match="input has 6 channels but the layer expects 8"):
        m(torch.randn(1, 4, 4, 6))
    with pytest.raises(ValueError, match="not a multiple of the window"):
        m(torch.randn(1, 5, 4, 8))
