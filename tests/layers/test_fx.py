"""FX symbolic tracing (detection / segmentation feature extractors): one node per ACmix layer."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.fx
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import acmix.models  # noqa: F401 (registers the models)
from acmix.layers import ACmix, ACmixConv2d, WindowACmix


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.mix = ACmix(16, 16, kernel_att=7, head=4, kernel_conv=3, stride=2)
        self.conv = ACmixConv2d(16, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.mix(self.stem(x))).relu()


def test_symbolic_trace_records_each_acmix_layer_as_one_call() -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    gm = torch.fx.symbolic_trace(net)
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "fx_leaf_call" in n.name]
    assert len(calls) == 2  # ACmix and ACmixConv2d, nothing traced inside them
    x = torch.randn(2, 3, 15, 17)  # odd sizes: the layer's own shape logic runs at call time
    torch.testing.assert_close(gm(x), net(x), rtol=0, atol=0)


def test_window_acmix_traces_with_and_without_a_mask() -> None:
    torch.manual_seed(0)
    layer = WindowACmix(16, 4, 2).eval()
    x = torch.randn(2, 8, 8, 16)

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    gm = torch.fx.symbolic_trace(Wrap())
    torch.testing.assert_close(gm(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["acmix_resnet26", "acmix_san10", "acmix_tiny"])
def test_timm_fx_features_equal_the_default_features(name: str) -> None:
    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    fx = timm.create_model(name, features_only=True, feature_cls="fx").eval()
    torch.manual_seed(0)
    plain = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        got, want = fx(x), plain(x)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torchvision_feature_extractor_equals_forward() -> None:
    torch.manual_seed(0)
    model = timm.create_model("acmix_resnet26", num_classes=5).eval()
    nodes = get_graph_node_names(model)[1]
    extractor = create_feature_extractor(model, return_nodes={"layer3": "c4", nodes[-1]: "out"})
    san = timm.create_model("acmix_san10", num_classes=5).eval()
    san_out = create_feature_extractor(san, return_nodes=[get_graph_node_names(san)[1][-1]])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = extractor(x)
        torch.testing.assert_close(feats["out"], model(x), rtol=0, atol=0)
        torch.testing.assert_close(next(iter(san_out(x).values())), san(x), rtol=0, atol=0)
        torch.testing.assert_close(
            feats["c4"], model.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
        )


def test_swin_traces_and_its_fx_features_are_the_stage_maps() -> None:
    name = "acmix_swin_tiny_patch4_window7_224"
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, num_classes=5).eval()
    gm = torch.fx.symbolic_trace(model)
    torch.manual_seed(0)
    fx = timm.create_model(name, img_size=64, features_only=True, feature_cls="fx").eval()
    torch.manual_seed(0)
    plain = timm.create_model(name, img_size=64, features_only=True).eval()
    with torch.no_grad():
        for x in (torch.randn(1, 3, 64, 64), torch.randn(1, 3, 50, 70)):  # odd stages pad
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
        x = torch.randn(1, 3, 64, 64)
        for a, b in zip(fx(x), plain(x), strict=True):  # timm's FX features stay NHWC
            torch.testing.assert_close(a.permute(0, 3, 1, 2), b, rtol=0, atol=0)


def test_pvt_traces_at_any_grid_size() -> None:
    torch.manual_seed(0)
    model = timm.create_model("acmix_pvt_tiny", num_classes=5).eval()
    gm = torch.fx.symbolic_trace(model)  # the position table resize is one call
    nodes = get_graph_node_names(model)[1]
    extractor = create_feature_extractor(model, return_nodes=[nodes[-1]])
    with torch.no_grad():
        for x in (torch.randn(1, 3, 224, 224), torch.randn(1, 3, 64, 96)):
            torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
            torch.testing.assert_close(next(iter(extractor(x).values())), model(x), rtol=0, atol=0)
