"""SAN (patchwise) with ACmix: the SAM against hand-written references, forward and
backward; the ACmix conv path; full-size params / MACs against DESIGN.md section 6."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from acmix.analysis import count_macs, count_params
from acmix.models import get_stats
from acmix.models.san import (
    SAN,
    PatchwiseSAM,
    SANBlock,
    checkpoint_filter_fn,
)
from acmix.ops import patchwise_aggregate

DEPTHS = {
    "acmix_san10": (2, 1, 2, 4, 1),
    "acmix_san15": (3, 2, 3, 5, 2),
    "acmix_san19": (3, 3, 4, 6, 3),
}
#: DESIGN.md section 6 (params in M, 2 decimals): baseline and ACmix.
DESIGN_PARAMS = {
    "acmix_san10": (11.84, 11.99),
    "acmix_san15": (16.18, 16.41),
    "acmix_san19": (20.52, 20.83),
}
#: DESIGN.md section 6: baseline GMACs as SAN's own counter gives them (it also
#: counts BN (2 per element), ReLU, pooling and conv biases).
DESIGN_SAN_COUNTER_GMACS = {"acmix_san10": 1.865, "acmix_san15": 2.583, "acmix_san19": 3.259}
WIDTHS = (64, 256, 512, 1024, 2048)
KERNELS = (3, 7, 7, 7, 7)

TINY = dict(
    depths=(1, 1, 1, 1, 1),
    kernels=(3, 3, 3, 3, 3),
    widths=(32, 32, 32, 64, 64),
    stem_width=16,
    num_classes=10,
)


def _refl(i: int, n: int) -> int:
    """Reflection (no edge repeat) of index ``i`` into ``[0, n)``."""
    if i < 0:
        return -i
    if i >= n:
        return 2 * (n - 1) - i
    return i


def _window_value(x: torch.Tensor, b: int, c: int, y: int, xx: int, padding: str) -> torch.Tensor:
    H, W = x.shape[-2:]
    if padding == "zeros":
        if 0 <= y < H and 0 <= xx < W:
            return x[b, c, y, xx]
        return x.new_zeros(())
    return x[b, c, _refl(y, H), _refl(xx, W)]


def _aggregate_loop(x: torch.Tensor, w: torch.Tensor, k: int, padding: str) -> torch.Tensor:
    """``out[b,c,i,j] = sum_p w[b, c % G, p, i, j] * x[b, c, i+dy_p, j+dx_p]``, pixel by pixel."""
    B, C, H, W = x.shape
    G = w.shape[1]
    r = k // 2
    out = torch.zeros_like(x)
    for b in range(B):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    acc = x.new_zeros(())
                    for p in range(k * k):
                        dy, dx = p // k - r, p % k - r
                        v = _window_value(x, b, c, i + dy, j + dx, padding)
                        acc = acc + w[b, c % G, p, i, j] * v
                    out[b, c, i, j] = acc
    return out


def _randomise(module: nn.Module) -> None:
    """Random BN statistics / affines so nothing passes by accident."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


# -- the patchwise aggregation -------------------------------------------------------------


@pytest.mark.parametrize("padding", ["reflect", "zeros"])
@pytest.mark.parametrize("backend", ["shift", "reference"])
def test_aggregate_matches_pixel_loop(padding: str, backend: str) -> None:
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    w = torch.randn(1, 2, 9, 5, 5, dtype=torch.float64)  # G = 2: channels c and c + 2 share
    out = patchwise_aggregate(x, w, 3, padding, backend)
    torch.testing.assert_close(out, _aggregate_loop(x, w, 3, padding), rtol=0, atol=1e-13)


@pytest.mark.parametrize("padding", ["reflect", "zeros"])
def test_aggregate_shift_gradcheck(padding: str) -> None:
    x = torch.randn(2, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 9, 3, 4, dtype=torch.float64, requires_grad=True)
    fn = lambda a, b: patchwise_aggregate(a, b, 3, padding)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w), fast_mode=True)


def test_aggregate_shift_backward_equals_reference() -> None:
    x = torch.randn(2, 8, 6, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 25, 6, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 8, 6, 7, dtype=torch.float64)
    grads = []
    for backend in ("shift", "reference"):
        out = patchwise_aggregate(x, w, 5, "reflect", backend)
        grads.append(torch.autograd.grad((out * g).sum(), (x, w)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_aggregate_bfloat16_accumulates_in_float32() -> None:
    x = torch.randn(2, 16, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 49, 9, 9, dtype=torch.float64, requires_grad=True)
    truth = patchwise_aggregate(x, w, 7)
    g = torch.randn_like(truth)
    gx, gw = torch.autograd.grad((truth * g).sum(), (x, w))
    xb = x.detach().bfloat16().requires_grad_()
    wb = w.detach().bfloat16().requires_grad_()
    out = patchwise_aggregate(xb, wb, 7)
    assert out.dtype == torch.bfloat16
    gxb, gwb = torch.autograd.grad((out * g.bfloat16()).sum(), (xb, wb))
    # Inputs rounded to bf16 (~3e-3 relative) and one final rounding: no 49-term bf16 sums.
    for got, want in ((out, truth), (gxb, gx), (gwb, gw)):
        assert got.dtype == torch.bfloat16
        assert (got.double() - want).abs().max() <= 1e-2 * want.abs().max()


def test_aggregate_bad_shapes_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="multiple of the weight channels"):
        patchwise_aggregate(torch.randn(1, 5, 4, 4), torch.randn(1, 2, 9, 4, 4), 3)
    with pytest.raises(ValueError, match="does not match"):
        patchwise_aggregate(torch.randn(1, 4, 4, 4), torch.randn(1, 2, 25, 4, 4), 3)


# -- the SAM ------------------------------------------------------------------------------


def _sam_loop(sam: PatchwiseSAM, x: torch.Tensor, padding: str) -> torch.Tensor:
    """Patchwise SAM (eval mode) written pixel by pixel from the module's weights."""
    k, K2, rel = sam.kernel_size, sam.kernel_size**2, sam.rel_planes
    x1 = F.conv2d(x, sam.conv1.weight, sam.conv1.bias)
    x2 = F.conv2d(x, sam.conv2.weight, sam.conv2.bias)
    x3 = F.conv2d(x, sam.conv3.weight, sam.conv3.bias)
    bn0, conv0, bn1, _, conv1 = (sam.conv_w[i] for i in (0, 2, 3, 4, 5))

    def bn(m: nn.BatchNorm2d, v: torch.Tensor) -> torch.Tensor:
        return (v - m.running_mean) / torch.sqrt(m.running_var + m.eps) * m.weight + m.bias

    B, _, H, W = x.shape
    G = sam.out_planes // sam.share_planes
    w = x.new_zeros(B, G, K2, H, W)
    r = k // 2
    for b in range(B):
        for i in range(H):
            for j in range(W):
                # SAN's feature vector: [x1 (rel), x2 window channel c*K2 + p].
                feat = [x1[b, c, i, j] for c in range(rel)]
                for c in range(rel):
                    for p in range(K2):
                        feat.append(_window_value(x2, b, c, i + p // k - r, j + p % k - r, padding))
                h = torch.relu(bn(bn0, torch.stack(feat)))
                h = conv0.weight[:, :, 0, 0] @ h
                h = torch.relu(bn(bn1, h))
                out = conv1.weight[:, :, 0, 0] @ h + conv1.bias  # channel g*K2 + p
                w[b, :, :, i, j] = out.view(G, K2)
    return _aggregate_loop(x3, w, k, padding)


@pytest.mark.parametrize("padding_mode", ["reflect", "zeros"])
@pytest.mark.parametrize("backend", ["shift", "reference"])
def test_sam_matches_pixel_loop(padding_mode: str, backend: str) -> None:
    sam = PatchwiseSAM(8, 2, 8, 4, 3, paths="attn", padding_mode=padding_mode, backend=backend)
    _randomise(sam)
    sam = sam.double().eval()
    x = torch.randn(1, 8, 4, 5, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sam(x), _sam_loop(sam, x, padding_mode), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("train", "chunks"), [(True, 2), (False, 2), (True, 1), (True, 5)])
def test_sam_shift_equals_reference_forward_backward_and_running_stats(
    train: bool, chunks: int
) -> None:
    torch.manual_seed(0)
    shift = PatchwiseSAM(32, 4, 16, 8, 5, backend="shift")
    shift.frugal_chunks = chunks  # rows of the 5x5 window per chunk: 5, 3 + 2, 1 each
    _randomise(shift)
    shift = shift.double().train(train)
    ref = copy.deepcopy(shift)
    ref.backend = "reference"
    x = torch.randn(2, 32, 6, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 16, 6, 7, dtype=torch.float64)
    results = []
    for m in (shift, ref):
        out = m(x)
        grads = torch.autograd.grad((out * g).sum(), (x, *m.parameters()))
        results.append((out, grads, [b.clone() for b in m.buffers()]))
    (o1, g1, b1), (o2, g2, b2) = results
    torch.testing.assert_close(o1, o2, rtol=0, atol=1e-12)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11)
    for a, b in zip(b1, b2, strict=True):  # running statistics updated identically
        torch.testing.assert_close(a, b, rtol=0, atol=1e-13)


@pytest.mark.parametrize("paths", ["attn", "both"])
def test_sam_gradcheck(paths: str) -> None:
    sam = PatchwiseSAM(8, 2, 8, 4, 3, paths=paths)
    _randomise(sam)
    sam = sam.double().eval()
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sam, (x,), fast_mode=True)


def _conv_path_by_hand(sam: PatchwiseSAM, x: torch.Tensor) -> torch.Tensor:
    """fc over the 6 groups [x1; x2; x3] of d = rel channels, then the pure 3x3 shift-sum."""
    rel, mid = sam.rel_planes, sam.out_planes
    feats = torch.cat([F.conv2d(x, m.weight, m.bias) for m in (sam.conv1, sam.conv2, sam.conv3)], 1)
    B, _, H, W = feats.shape
    groups = feats.view(B, 6, rel, H, W)
    fc = sam.fc.weight.view(9, 6)
    maps = torch.einsum("bmdhw,km->bdkhw", groups, fc)  # (B, d, 9, H, W)
    padded = F.pad(maps, (1, 1, 1, 1))
    shifted = sum(padded[:, :, p, p // 3 : p // 3 + H, p % 3 : p % 3 + W] for p in range(9))
    # Output channel o reads within-group channel o // (mid / d).
    return shifted.repeat_interleave(mid // rel, dim=1)


def test_acmix_sam_at_paper_init_with_alpha0_beta1_is_its_conv_path() -> None:
    sam = PatchwiseSAM(16, 2, 8, 4, 3).double().eval()  # paper init: dep_conv = shift
    with torch.no_grad():
        sam.rate1.fill_(0.0)
        sam.rate2.fill_(1.0)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sam(x), _conv_path_by_hand(sam, x), rtol=0, atol=1e-12)


def test_acmix_sam_with_alpha1_beta0_is_the_plain_sam() -> None:
    acm = PatchwiseSAM(16, 2, 8, 4, 3)
    _randomise(acm)
    acm = acm.double().eval()
    plain = PatchwiseSAM(16, 2, 8, 4, 3, paths="attn").double().eval()
    missing, unexpected = plain.load_state_dict(acm.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"fc.weight", "dep_conv.weight", "rate1", "rate2"}
    with torch.no_grad():
        acm.rate1.fill_(1.0)
        acm.rate2.fill_(0.0)
    x = torch.randn(2, 16, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(acm(x), plain(x), rtol=0, atol=0)


def test_acmix_block_at_paper_init_with_alpha0_beta1_uses_the_conv_path() -> None:
    block = SANBlock(32, 3).double().eval()
    with torch.no_grad():
        block.sam.rate1.fill_(0.0)
        block.sam.rate2.fill_(1.0)
    x = torch.randn(1, 32, 4, 5, dtype=torch.float64)
    pre = F.relu(block.bn1(x))
    expected = x + block.conv(F.relu(block.bn2(_conv_path_by_hand(block.sam, pre))))
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-12)


def test_sam_small_map_padding_modes() -> None:
    sam = PatchwiseSAM(32, 2, 8, 4, 7, padding_mode="reflect")
    with pytest.raises(ValueError, match="too small for reflection padding"):
        sam(torch.randn(1, 32, 3, 3))
    sam.padding_mode = "auto"  # zeros on maps of <= 3 pixels, reflect otherwise
    out = sam(torch.randn(1, 32, 2, 3))
    assert out.shape == (1, 8, 2, 3) and torch.isfinite(out).all()


def test_sam_argument_errors() -> None:
    with pytest.raises(ValueError, match="multiple of share_planes"):
        PatchwiseSAM(32, 2, 12, 8, 3)
    with pytest.raises(ValueError, match="must be odd"):
        PatchwiseSAM(32, 2, 8, 4, 4)
    with pytest.raises(ValueError, match="expected input"):
        PatchwiseSAM(32, 2, 8, 4, 3)(torch.randn(1, 16, 4, 4))


# -- the network ---------------------------------------------------------------------------


def test_san_any_input_from_32_and_too_small_error() -> None:
    model = SAN(**{**TINY, "kernels": KERNELS}).eval()
    with torch.no_grad():
        for size in ((32, 32), (45, 37)):
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, 10) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=">= 32"):
        model(torch.randn(1, 3, 31, 64))


def test_san_mixer_choices() -> None:
    with pytest.raises(ValueError, match=r"mixer must be one of .*'acmix_conv'.*got 'sasa'"):
        SAN(**TINY, mixer="sasa")
    conv = SAN(**TINY, mixer="conv")  # a plain 3x3 conv C -> mid in place of the SAM
    sam = conv.stages[1].blocks[0].sam
    assert type(sam) is nn.Conv2d and sam.kernel_size == (3, 3) and sam.bias is None
    plain = SAN(**TINY, mixer="attn")
    assert not any(
        n.endswith(("rate1", "rate2", "fc.weight"))
        for n, _ in plain.named_parameters()
        if ".sam." in n
    )
    assert plain.no_weight_decay() == set()


def test_features_are_the_last_four_stages() -> None:
    model = timm.create_model("acmix_san10", features_only=True, **TINY).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [32, 32, 64, 64]
    full = SAN(**TINY).eval()
    full.load_state_dict(model.model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model(x)
        h = full.stem(x)
        expected = []
        for i, s in enumerate(full.stages):
            h = s(h)
            if i >= 1:
                expected.append(h)
    for f, e in zip(feats, expected, strict=True):
        torch.testing.assert_close(f, e)


def _to_san_authors_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys written the SAN authors' way (model/san.py, DataParallel prefix)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("stem.conv.", "conv_in.").replace("stem.bn.", "bn_in.")
        parts = k.split(".")
        if parts[0] == "stages":
            i = parts[1]
            if parts[2] == "blocks":
                k = ".".join([f"layer{i}", *parts[3:]])
            elif parts[2] == "conv":
                k = ".".join([f"conv{i}", *parts[3:]])
            elif parts[2] == "norm":
                k = ".".join([f"bn{i}", *parts[3:]])
        out["module." + k] = v
    return out


def test_checkpoint_filter_maps_the_san_authors_layout() -> None:
    src = SAN(**TINY, mixer="attn")
    _randomise(src)
    src.eval()
    sd = _to_san_authors_keys(src.state_dict())
    assert "module.layer0.0.sam.conv_w.0.running_mean" in sd and "module.conv_in.weight" in sd
    dst = SAN(**TINY, mixer="attn").eval()
    dst.load_state_dict(checkpoint_filter_fn({"state_dict": sd}, dst), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


# -- full-size params / MACs ---------------------------------------------------------------


def _analytic(depths: tuple[int, ...], acmix: bool) -> dict[str, int]:
    """Params and MACs of SAN at 224 from the architecture of DESIGN.md section 6.

    ``macs``: convolutions, linear and aggregation multiply-adds (our counter's
    convention); ``extra_san_counter``: what SAN's own counter adds (BN 2 per
    element, ReLU 1, max/avg pool 1 per input element, conv biases 1 per output).
    """
    params = 3 * 64 + 2 * 64
    size = 224
    macs = 3 * 64 * size * size
    extra = 3 * 64 * size * size  # stem BN + ReLU
    cin = 64
    for d, k, c in zip(depths, KERNELS, WIDTHS, strict=True):
        extra += cin * size * size  # max pool input
        size //= 2
        hw = size * size
        params += cin * c + 2 * c
        macs += cin * c * hw
        rel, mid = c // 16, c // 4
        g, k2 = mid // 8, k * k
        for _ in range(d):
            params += 2 * c + 2 * (c * rel + rel) + c * mid + mid
            params += 2 * rel * (k2 + 1) + rel * (k2 + 1) * g + 2 * g + g * k2 * g + k2 * g
            params += 2 * mid + mid * c + c
            macs += (2 * c * rel + c * mid + rel * (k2 + 1) * g + g * k2 * g + mid * c) * hw
            macs += k2 * mid * hw  # aggregation
            extra += 3 * c * hw + (2 * rel + mid) * hw  # bn1 + relu, projection biases
            extra += 3 * rel * (k2 + 1) * hw + 3 * g * hw + k2 * g * hw  # MLP BN/ReLU/bias
            extra += 3 * mid * hw + c * hw  # bn2 + relu, output conv bias
            if acmix:
                params += 81 * mid + 6 * 9 + 2  # dep_conv, fc (6 -> 9), rate1/2
                macs += 81 * mid * hw + 6 * 9 * rel * hw
        extra += 3 * c * hw  # stage BN + ReLU
        cin = c
    extra += cin * size * size  # global average pool
    params += cin * 1000 + 1000
    macs += cin * 1000
    return dict(params=params, macs=macs, extra_san_counter=extra)


def _meta(name: str, **kwargs: object) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs).eval()


@pytest.mark.parametrize("name", sorted(DEPTHS))
def test_full_size_params_and_macs(name: str) -> None:
    stats = get_stats(name)
    base_m, acmix_m = _meta(name, mixer="attn"), _meta(name)
    base_p, acmix_p = count_params(base_m), count_params(acmix_m)
    x = torch.empty(1, 3, 224, 224, device="meta")
    base_macs, acmix_macs = count_macs(base_m, x).total, count_macs(acmix_m, x).total
    want_base, want_acmix = _analytic(DEPTHS[name], False), _analytic(DEPTHS[name], True)

    assert (base_p, base_macs) == (want_base["params"], want_base["macs"])
    assert (acmix_p, acmix_macs) == (want_acmix["params"], want_acmix["macs"])
    assert (acmix_p, acmix_macs) == (stats.params, stats.macs)
    # DESIGN.md section 6, to its two decimals.
    assert round(base_p / 1e6, 2) == DESIGN_PARAMS[name][0]
    assert round(acmix_p / 1e6, 2) == DESIGN_PARAMS[name][1]
    # DESIGN's baseline GMACs are SAN's own counter: ours plus BN / ReLU / pool / biases.
    san_counter = (base_macs + want_base["extra_san_counter"]) / 1e9
    assert round(san_counter, 3) == DESIGN_SAN_COUNTER_GMACS[name]
    # The paper: params within 3%, MACs within 5%.
    assert abs(acmix_p / stats.paper_params - 1) <= 0.03
    assert abs(acmix_macs / stats.paper_macs - 1) <= 0.05


def test_san_authors_checkpoint_converts_and_loads_through_timm(tmp_path) -> None:
    from acmix.models.convert import convert_checkpoint

    src = SAN(**TINY, mixer="attn")
    _randomise(src)
    src.eval()
    path = tmp_path / "san_authors.pth"
    torch.save({"state_dict": _to_san_authors_keys(src.state_dict())}, path)
    dst = tmp_path / "san10_tiny.safetensors"
    convert_checkpoint(path, dst, "acmix_san10", mixer="attn", **TINY)
    overlay = dict(file=str(dst), num_classes=10)
    model = timm.create_model(
        "acmix_san10", pretrained=True, pretrained_cfg_overlay=overlay, mixer="attn", **TINY
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
