"""The spatial ACmix layer: parity with the authors' fixtures, options, dtypes, errors, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from acmix.layers import ACmix, ACmixConv2d, create_mixer, shift_sum
from acmix.ops import choose_backend, conv_path_features
from tests.conftest import load_fixture, max_abs, rel_err, requires_cuda

RESNET_CASES = [
    "01_acmix_resnet_s1",
    "02_acmix_resnet_in8_out16",
    "03_acmix_resnet_s2",
    "04_acmix_resnet_k5_h2_odd",
]


def _run_fixture(fx: dict, dtype: torch.dtype, backend: str):
    m = ACmix(**fx["config"], backend=backend).to(dtype).eval()
    m.load_state_dict(fx["state_dict"])  # the authors' keys, strict
    x = fx["input"].to(dtype).requires_grad_(True)
    y = m(x)
    (y * fx["grad_output"].to(dtype)).sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    return y, x.grad, grads


@pytest.mark.parametrize("name", RESNET_CASES)
@pytest.mark.parametrize("backend", ["cpp", "shift", "reference"])
def test_fixture_parity_float64(fixtures_dir, name, backend) -> None:
    fx = load_fixture(fixtures_dir, name)
    y, gx, grads = _run_fixture(fx, torch.float64, backend)
    assert y.shape == fx["output"].shape
    assert max_abs(y, fx["output"]) <= 1e-9
    assert max_abs(gx, fx["grad_input"]) <= 1e-9
    assert set(fx["param_grads"]) == set(grads)
    for key, g in fx["param_grads"].items():
        assert max_abs(grads[key], g) <= 1e-9, key
    assert sum(p.numel() for p in grads.values()) == fx["num_params"]


@pytest.mark.parametrize("name", RESNET_CASES)
@pytest.mark.parametrize("backend", ["cpp", "shift"])
def test_fixture_parity_float32(fixtures_dir, name, backend) -> None:
    fx = load_fixture(fixtures_dir, name)
    y, gx, grads = _run_fixture(fx, torch.float32, backend)
    assert rel_err(y, fx["output"]) <= 1e-4
    assert rel_err(gx, fx["grad_input"]) <= 1e-4
    for key, g in fx["param_grads"].items():
        if key == "conv_p.bias":
            # A constant shift of the encoding cancels in k_n + pe_c - pe_n: the true
            # gradient is exactly zero (the fixture holds float64 round-off, ~1e-16).
            assert g.abs().max() < 1e-12
            assert grads[key].abs().max() < 1e-4
            continue
        assert rel_err(grads[key], g) <= 1e-4, key


def _fwd_bwd(m: nn.Module, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().requires_grad_(True)
    m.zero_grad(set_to_none=True)
    y = m(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize(
    ("stride", "padding_mode", "hw"), [(1, "reflect", (12, 13)), (2, "zeros", (11, 14))]
)
def test_fused_stage2_equals_composed_paths_and_reference(stride, padding_mode, hw) -> None:
    """One fused CPU node (both kernels + mix) = the composed paths = the reference path."""
    torch.manual_seed(0)
    m = ACmix(16, 16, kernel_att=5, head=4, stride=stride, padding_mode=padding_mode).double()
    with torch.no_grad():  # rates and a learned-looking grouped conv, not the init values
        m.rate1.fill_(0.7)
        m.rate2.fill_(-1.3)
        m.dep_conv.weight.normal_()
    x = torch.randn(2, 16, *hw, dtype=torch.float64)
    g = torch.randn(2, 16, -(-hw[0] // stride), -(-hw[1] // stride), dtype=torch.float64)
    qkv = torch.nn.functional.conv2d(x, *m.qkv_weight())
    assert choose_backend("acmix_stage2", (qkv,), "auto", stride=stride) == "cpp"
    fused = _fwd_bwd(m, x, g)
    m.fuse_stage2 = False
    composed = _fwd_bwd(m, x, g)
    m.fuse_stage2 = True
    m.backend = "reference"
    reference = _fwd_bwd(m, x, g)
    for other in (composed, reference):
        assert max_abs(fused[0], other[0]) < 1e-12
        assert max_abs(fused[1], other[1]) < 1e-12
        for key, grad in other[2].items():
            assert max_abs(fused[2][key], grad) < 1e-11 * max(1.0, grad.abs().max().item()), key


def test_state_dict_round_trip_and_authors_keys() -> None:
    m = ACmix(16, 16)
    keys = set(m.state_dict())
    assert keys == {
        "conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "conv3.weight",
        "conv3.bias", "conv_p.weight", "conv_p.bias", "fc.weight", "dep_conv.weight",
        "rate1", "rate2",
    }  # fmt: skip
    m2 = ACmix(16, 16)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(1, 16, 9, 9)
    assert torch.equal(m(x), m2(x))


def _randomise(m: nn.Module) -> None:
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


def test_alpha_beta_select_paths() -> None:
    """alpha=1, beta=0: pure local attention; alpha=0, beta=1: pure conv path."""
    m = ACmix(8, 8, kernel_att=5, head=2).double()
    _randomise(m)
    att_only = ACmix(8, 8, kernel_att=5, head=2, paths="attn").double()
    conv_only = ACmix(8, 8, kernel_att=5, head=2, paths="conv").double()
    att_only.load_state_dict(m.state_dict(), strict=False)
    conv_only.load_state_dict(m.state_dict(), strict=False)
    x = torch.randn(2, 8, 7, 9, dtype=torch.float64)
    with torch.no_grad():
        m.rate1.fill_(1.0)
        m.rate2.fill_(0.0)
        assert max_abs(m(x), att_only(x)) < 1e-13
        m.rate1.fill_(0.0)
        m.rate2.fill_(1.0)
        assert max_abs(m(x), conv_only(x)) < 1e-13


@pytest.mark.parametrize("stride", [1, 2])
def test_paper_init_conv_path_is_shift_and_sum(stride) -> None:
    """At the paper init the learnable group conv equals the explicit shift-and-sum."""
    layers = {
        mode: ACmix(8, 8, head=2, stride=stride, shift_mode=mode, paths="conv").double()
        for mode in ("learnable", "fixed", "tensor")
    }
    sd = layers["learnable"].state_dict()
    for mode in ("fixed", "tensor"):
        layers[mode].load_state_dict({k: v for k, v in sd.items() if "dep_conv" not in k})
    x = torch.randn(2, 8, 9, 8, dtype=torch.float64)
    outs = {mode: layer(x) for mode, layer in layers.items()}
    # Explicit: fc features, shift each of the 9 maps to its offset, sum, repeat per group.
    m = layers["learnable"]
    w, b = m.qkv_weight()
    qkv = torch.nn.functional.conv2d(x, w, b).view(2, 6, 4, 9, 8)
    feats = conv_path_features(qkv, m.fc.weight).view(2, 4, 9, 9, 8)
    explicit = shift_sum(feats, 3, stride, repeat=2)
    for mode, out in outs.items():
        assert max_abs(out, explicit) < 1e-12, mode


def test_official_init_overwrites_shift() -> None:
    torch.manual_seed(0)
    paper = ACmix(16, 16, init="paper")
    torch.manual_seed(0)
    official = ACmix(16, 16, init="official")
    assert not torch.equal(paper.dep_conv.weight, official.dep_conv.weight)
    assert float(paper.rate1) == float(official.rate1) == 0.5


@pytest.mark.parametrize("kernel_conv", [1, 3, 5, 7])
@pytest.mark.parametrize(
    ("hw", "stride"), [((15, 15), 2), ((13, 14), 2), ((9, 11), 1), ((10, 7), 3)]
)
def test_any_odd_kernel_and_size(kernel_conv, hw, stride) -> None:
    m = ACmix(8, 12, kernel_att=5, head=3, kernel_conv=kernel_conv, stride=stride)
    y = m(torch.randn(2, 8, *hw))
    assert y.shape == (2, 12, -(-hw[0] // stride), -(-hw[1] // stride))
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_mlp_weighting_layer() -> None:
    m = ACmix(8, 8, kernel_att=3, head=2, attn_weight="mlp").double()
    ref = ACmix(8, 8, kernel_att=3, head=2, attn_weight="mlp", backend="reference").double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 8, 6, 5, dtype=torch.float64)
    assert max_abs(m(x), ref(x)) < 1e-12
    assert "attn_mlp.0.weight" in m.state_dict()


def test_padding_modes_on_small_maps() -> None:
    x = torch.randn(1, 16, 3, 3)
    with pytest.raises(ValueError, match="too small for reflection.*padding_mode='zeros'"):
        ACmix(16, 16)(x)
    auto = ACmix(16, 16, padding_mode="auto")
    zeros = ACmix(16, 16, padding_mode="zeros")
    zeros.load_state_dict(auto.state_dict())
    assert torch.allclose(auto(x), zeros(x))  # falls back to masking on a 3x3 map
    big = torch.randn(1, 16, 8, 8)
    reflect = ACmix(16, 16)
    reflect.load_state_dict(auto.state_dict())
    assert torch.allclose(auto(big), reflect(big))  # reflects where it can


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_modules(dtype) -> None:
    m = ACmix(16, 16, head=4)
    x = torch.randn(2, 16, 10, 10)
    ref = m(x)
    y = m.to(dtype)(x.to(dtype))
    assert y.dtype == dtype
    assert rel_err(y.float(), ref) < 0.05
    y.float().sum().backward()


def test_autocast_bfloat16_cpu() -> None:
    m = ACmix(16, 16)
    x = torch.randn(2, 16, 10, 10)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y.float(), ref) < 0.05
    y.float().sum().backward()
    assert m.conv1.weight.grad is not None


def test_bad_inputs_give_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"out_planes \(10\) must be divisible by head \(4\)"):
        ACmix(8, 10)
    with pytest.raises(ValueError, match="kernel_att must be odd.*got 4"):
        ACmix(8, 8, kernel_att=4)
    with pytest.raises(ValueError, match="kernel_conv must be >= 1, got 0"):
        ACmix(8, 8, kernel_conv=0)
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        ACmix(8, 8, stride=0)
    with pytest.raises(ValueError, match="dilation=2 is not supported"):
        ACmix(8, 8, dilation=2)
    with pytest.raises(TypeError, match="head must be an int"):
        ACmix(8, 8, head=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shift_mode must be one of"):
        ACmix(8, 8, shift_mode="roll")
    m = ACmix(8, 8)
    with pytest.raises(ValueError, match=r"4 dimensions \(B, C, H, W\), got shape \(8, 9, 9\)"):
        m(torch.randn(8, 9, 9))
    with pytest.raises(ValueError, match="input has 3 channels but the layer expects 8"):
        m(torch.randn(1, 3, 9, 9))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        m(torch.ones(1, 8, 9, 9, dtype=torch.long))


def test_jit_trace_and_export() -> None:
    m = ACmix(8, 8, kernel_att=5, head=2).eval()
    x = torch.randn(1, 8, 9, 9)
    with torch.no_grad():
        traced = torch.jit.trace(m, x)
        assert torch.allclose(traced(x), m(x), atol=1e-6)
    exported = torch.export.export(m, (x,))
    assert torch.allclose(exported.module()(x), m(x), atol=1e-6)


@pytest.mark.slow
def test_torch_compile_forward_backward() -> None:
    m = ACmix(8, 8, kernel_att=3, head=2)
    x = torch.randn(1, 8, 8, 8, requires_grad=True)
    compiled = torch.compile(m, backend="aot_eager")
    y = compiled(x)
    assert torch.allclose(y, m(x), atol=1e-6)
    y.sum().backward()
    assert x.grad is not None


def test_acmix_conv2d_drop_in() -> None:
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10)
    net.layer1[0].conv2 = ACmixConv2d.from_conv2d(net.layer1[0].conv2)
    net.layer4[0].conv1 = ACmixConv2d.from_conv2d(net.layer4[0].conv1)  # stride 2, 1x1 map later
    y = net(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 10)
    with pytest.raises(ValueError, match="'same'-padded: padding must be 1"):
        ACmixConv2d(8, 8, 3, padding=0)
    assert ACmixConv2d(6, 6).head == 2


def test_create_mixer_kinds() -> None:
    x = torch.randn(1, 8, 9, 9)
    for kind in ("acmix", "conv", "attn"):
        assert create_mixer(kind, 8, 16, 2)(x).shape == (1, 16, 5, 5)
    with pytest.raises(ValueError, match="mixer must be one of"):
        create_mixer("mlp", 8, 8)


@requires_cuda
@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    m = ACmix(16, 16).double()
    x = torch.randn(2, 16, 12, 12, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y.sum().backward()
    mc = ACmix(16, 16).double().cuda()
    mc.load_state_dict(m.state_dict())
    xc = x.detach().cuda().requires_grad_(True)
    yc = mc(xc)
    yc.sum().backward()
    assert max_abs(yc.cpu(), y) < 1e-10
    assert max_abs(xc.grad.cpu(), x.grad) < 1e-10
    with torch.autocast("cuda", dtype=torch.float16):
        assert mc.float()(xc.float()).dtype == torch.float16
