"""Layer-level promises: a wrong number or a silent fix-up is always an error instead.

Double backward through a fast backend, a convolution ACmix cannot reproduce,
inputs and options the layers cannot honour (issue 11, items 1, 9, 10).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.func import functional_call

import acmix
from acmix import ACmix, ACmixConv2d, WindowACmix

# -- item 1: double backward (a gradient penalty into conv1.weight) -----------------------------


def _penalty(layer: ACmix, x: torch.Tensor) -> torch.Tensor:
    """A gradient penalty: ``|d(sum y^2)/dx|^2``, to be differentiated again."""
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    return g.square().sum()


@pytest.mark.parametrize("backend", ["auto", "shift"])
def test_gradient_penalty_through_a_fast_backend_is_an_error(backend: str) -> None:
    layer = ACmix(4, 4, kernel_att=3, head=2, backend=backend).double()
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        _penalty(layer, x).backward()
    assert layer.conv1.weight.grad is None  # no partial, wrong gradient left behind


def test_gradient_penalty_through_the_reference_is_exact() -> None:
    layer = ACmix(4, 4, kernel_att=3, head=2, backend="reference").double()
    x = torch.randn(1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    w = layer.conv1.weight.detach().clone().requires_grad_(True)

    def f(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, {"conv1.weight": w}, (x,))

    assert torch.autograd.gradgradcheck(f, (x, w))
    _penalty(layer, x).backward()
    assert layer.conv1.weight.grad is not None and layer.conv1.weight.grad.abs().sum() > 0


# -- item 9: from_conv2d and convert_model reproduce the convolution or refuse it ----------------


@pytest.mark.parametrize(
    ("conv", "match"),
    [
        (nn.Conv2d(8, 16, 3, padding=0), r"padding=\(0, 0\) would not"),
        (nn.Conv2d(8, 16, 3, padding=2, dilation=2), r"dilation 1"),
        (nn.Conv2d(8, 16, 3, padding=1, groups=2), r"groups 1"),
        (nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv2d(8, 16, 4, padding=2), "must be odd"),
        (nn.Conv2d(8, 16, (3, 5), padding=(1, 2)), "square"),
        (nn.Conv2d(8, 16, 3, padding="valid"), "padding='valid' would not"),
    ],
)
def test_from_conv2d_refuses_what_it_cannot_reproduce(conv: nn.Conv2d, match: str) -> None:
    with pytest.raises(ValueError, match=r"cannot replace Conv2d\(8, 16, .*" + match):
        ACmixConv2d.from_conv2d(conv)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 16, 3, padding=1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.Conv2d(8, 16, 5, padding="same"),
        nn.Conv2d(8, 16, 1),
    ],
)
def test_from_conv2d_gives_the_convolutions_output_shape(conv: nn.Conv2d) -> None:
    x = torch.randn(1, 8, 9, 11)
    assert ACmixConv2d.from_conv2d(conv)(x).shape == conv(x).shape


def test_convert_model_replaces_the_kxk_convs_and_reports() -> None:
    net = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    report = acmix.convert_model(net, lambda name, conv: name.startswith("layer1"))
    assert [r.name for r in report if r.replaced] == [
        "layer1.0.conv1",
        "layer1.0.conv2",
        "layer1.1.conv1",
        "layer1.1.conv2",
    ]
    assert isinstance(net.layer1[0].conv2, ACmixConv2d)
    assert net(x).shape == (1, 10)
    # The default: every k x k conv (the 1x1 downsamples are not selected, and the
    # ACmix layers' own convolutions are left alone).
    report = acmix.convert_model(net)
    assert {r.name for r in report} == {"conv1"} | {
        f"layer{i}.{j}.conv{c}" for i in (2, 3, 4) for j in (0, 1) for c in (1, 2)
    }
    assert all(r.replaced for r in report)
    assert net(x).shape == (1, 10)
    with pytest.raises(ValueError, match="selected no nn.Conv2d"):
        acmix.convert_model(net)


def test_convert_model_refuses_what_it_cannot_reproduce_and_changes_nothing() -> None:
    net = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
    )
    refused = r"2 selected .*\n  1: .*\(dilation 1\)\n  2: .*\(groups 1\)"
    with pytest.raises(ValueError, match=refused):
        acmix.convert_model(net)
    assert not any(isinstance(m, ACmixConv2d) for m in net)  # untouched
    report = acmix.convert_model(net, skip_unsupported=True, num_heads=2)
    assert [(r.name, r.replaced) for r in report] == [("0", True), ("1", False), ("2", False)]
    assert "dilation 1" in report[1].reason and "groups 1" in report[2].reason
    assert isinstance(net[0], ACmixConv2d) and isinstance(net[1], nn.Conv2d)
    x = torch.randn(1, 4, 9, 9)
    assert net(x).shape == (1, 8, 9, 9)


def test_convert_model_replaces_a_shared_conv_once() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), conv)
    report = acmix.convert_model(net, num_heads=2)
    assert [r.name for r in report] == ["0", "2"] and all(r.replaced for r in report)
    assert net[0] is net[2] and isinstance(net[0], ACmixConv2d)


# -- item 10: inputs and options the layers cannot honour ---------------------------------------


@pytest.mark.parametrize(
    ("shape", "dtype", "error", "match"),
    [
        ((1, 4, 0, 5), torch.float32, ValueError, r"shape \(1, 4, 0, 5\).*must be >= 1"),
        ((1, 4, 5, 0), torch.float32, ValueError, r"shape \(1, 4, 5, 0\)"),
        ((1, 4, 5, 5), torch.complex64, TypeError, r"real floating-point tensor.*complex64"),
        ((1, 4, 5, 5), torch.int64, TypeError, r"got dtype torch.int64"),
    ],
)
def test_acmix_input_errors_name_the_value(shape, dtype, error, match) -> None:
    layer = ACmix(4, 4, kernel_att=3, head=2, padding_mode="zeros")
    with pytest.raises(error, match=match):
        layer(torch.zeros(shape, dtype=dtype))
    assert layer(torch.zeros(0, 4, 5, 5)).shape == (0, 4, 5, 5)  # an empty batch is fine


@pytest.mark.parametrize("hidden", [0, -3, 2.5])
def test_mlp_hidden_must_be_a_positive_int(hidden) -> None:
    with pytest.raises((ValueError, TypeError), match=f"mlp_hidden must be.*{hidden}"):
        ACmix(4, 4, kernel_att=3, head=2, attn_weight="mlp", mlp_hidden=hidden)
    layer = ACmix(4, 4, kernel_att=3, head=2, attn_weight="mlp", mlp_hidden=5)
    assert layer.attn_mlp[0].out_features == 5
    assert ACmix(4, 4, 3, 2, attn_weight="mlp").attn_mlp[0].out_features == 2  # d by default


@pytest.mark.parametrize("mask_shape", [(2, 4, 4), (1, 4, 4), (3, 4, 4), (4, 3, 3), (4, 16)])
def test_window_mask_of_the_wrong_shape_is_an_error(mask_shape) -> None:
    layer = WindowACmix(dim=8, window_size=2, num_heads=2)
    x = torch.randn(2, 4, 4, 8)  # 4 windows per image
    assert layer(x, torch.zeros(4, 4, 4)).shape == x.shape
    with pytest.raises(ValueError, match=rf"mask must be .* = \(4, 4, 4\).*got \(?{mask_shape[0]}"):
        layer(x, torch.zeros(mask_shape))


def test_window_input_errors_name_the_value() -> None:
    layer = WindowACmix(dim=8, window_size=2, num_heads=2)
    with pytest.raises(ValueError, match=r"shape \(2, 0, 4, 8\)"):
        layer(torch.randn(2, 0, 4, 8))
    with pytest.raises(TypeError, match="complex"):
        layer(torch.randn(2, 4, 4, 8, dtype=torch.complex64))
