"""Table 1 (analytic vs counted), ACmix-vs-conv comparison, α/β inspection, and their CLI."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from acmix.analysis.cost import PAPER_CHANNELS, PAPER_SIZES, compare_with_conv, cost_table
from acmix.analysis.inspect import (
    format_rates,
    path_contributions,
    plot_rates,
    rates_from_state_dict,
)
from acmix.cli import main
from acmix.layers import ACmix


def test_paper_grid_analytic_equals_counted() -> None:
    """Every row of Table 1 at C = 64..512, 56²..7²: the counter agrees with the formulas."""
    rows = cost_table(PAPER_CHANNELS, PAPER_SIZES)
    assert len(rows) == 4 * 4 * 5
    for r in rows:
        assert r.counted_stage1_macs == r.stage1_macs, r
        if "fixed" in r.module:
            # The fixed-kernel group conv runs k^4 C HW MACs of which k^2 C HW are shifts.
            C, HW = r.channels, r.size**2
            assert r.counted_stage2_macs - r.stage2_macs == (81 - 9) * C * HW
        else:
            assert r.counted_stage2_macs == r.stage2_macs, r
    # The paper's claim: stage I grows with C^2, stage II with C.
    acmix = {(r.channels, r.size): r for r in rows if "learnable" in r.module}
    assert acmix[(128, 56)].stage1_macs == 4 * acmix[(64, 56)].stage1_macs
    assert acmix[(128, 56)].stage2_macs == pytest.approx(2 * acmix[(64, 56)].stage2_macs, rel=0.01)
    # DESIGN.md: at C=64, 56x56 the authors' stage II (~41M) is about stage I (38.5M).
    r = acmix[(64, 56)]
    assert r.stage1_macs == 38_535_168
    assert 40e6 < r.stage2_macs < 42e6


def test_compare_with_conv_table() -> None:
    text = compare_with_conv(16, 64, 3, size=14)
    conv_params = 16 * 64 * 9 + 64
    assert f"| Conv2d 3×3 | {conv_params:,} | 1.00 |" in text
    assert "| ACmix |" in text


def _tiny_net() -> nn.Module:
    return nn.Sequential(ACmix(8, 8, head=2), nn.ReLU(), ACmix(8, 8, head=2))


def test_rates_and_contributions(tmp_path) -> None:
    net = _tiny_net()
    with torch.no_grad():
        net[0].rate1.fill_(0.25)
        net[2].rate2.fill_(2.0)
    rows = rates_from_state_dict(net.state_dict())
    assert [(r.layer, r.alpha, r.beta) for r in rows] == [("0", 0.25, 0.5), ("2", 0.5, 2.0)]
    x = torch.randn(2, 8, 9, 9)
    measured = path_contributions(net, x)
    # Truth: the same quantities computed by hand for the first layer.
    layer = net[0]
    w, b = layer.qkv_weight()
    B = 2
    qkv = torch.nn.functional.conv2d(x, w, b)
    att = layer._attention(qkv)
    conv = layer.forward_conv_path(qkv.view(B, 6, 4, 9, 9))
    assert measured[0].att_magnitude == pytest.approx((0.25 * att).abs().mean().item(), rel=1e-5)
    assert measured[0].conv_magnitude == pytest.approx((0.5 * conv).abs().mean().item(), rel=1e-5)
    assert "mix" not in vars(layer)  # the instrumentation is removed again
    text = format_rates(measured)
    assert "attention share" in text
    png = plot_rates(measured, tmp_path / "rates.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_analyze_inspect_flops(tmp_path, capsys) -> None:
    assert (
        main(["analyze", "cost", "--channels", "16", "--sizes", "7", "--out-dir", str(tmp_path)])
        == 0
    )
    assert (tmp_path / "cost.png").read_bytes()[:4] == b"\x89PNG"
    assert "ACmix (learnable group conv)" in (tmp_path / "cost.md").read_text()
    assert main(["analyze", "cost", "--in", "16", "--out", "32", "--size", "14"]) == 0

    ckpt = tmp_path / "w.safetensors"
    save_file(_tiny_net().state_dict(), str(ckpt))
    assert main(["inspect", str(ckpt), "--plot", str(tmp_path / "ab.png")]) == 0
    out = capsys.readouterr().out
    assert "| 0 | 0 | 0.5000 | 0.5000 | 0.500 |" in out
    assert (tmp_path / "ab.png").exists()
    assert main(["inspect", str(tmp_path / "nope.pt")]) == 1

    assert main(["flops", "--paper-table"]) == 0
    out = capsys.readouterr().out
    assert "acmix_resnet50 | 18,333,976 | 18,333,976" in out
    assert main(["flops", "acmix_resnet26", "--img-size", "64", "--per-layer"]) == 0
    assert "| layer1 |" in capsys.readouterr().out
    assert main(["flops", "no_such_model"]) == 2


def test_shift_sum_conv_is_the_convolution_it_counts() -> None:
    from acmix.analysis.cost import ShiftSumConv

    m = ShiftSumConv(5, 3).double()
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    weight = m.proj.weight.view(3, 3, 5, 5).permute(2, 3, 0, 1)
    torch.testing.assert_close(m(x), torch.nn.functional.conv2d(x, weight, padding=1))
