"""PVT v1 with ACmix: spatial-reduction attention against an explicit softmax reference,
the ACmix conv path, any input size, full-size params / MACs against DESIGN.md section 6."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from acmix.analysis import count_macs, count_params
from acmix.models import get_stats
from acmix.models.pvt import PyramidVisionTransformer, SRAttention, checkpoint_filter_fn

DEPTHS = {"acmix_pvt_tiny": (2, 2, 2, 2), "acmix_pvt_small": (3, 4, 6, 3)}
DIMS, HEADS, SR = (64, 128, 320, 512), (1, 2, 5, 8), (8, 4, 2, 1)
#: DESIGN.md section 6: (params in M, GMACs), baseline and ACmix.
DESIGN = {
    "acmix_pvt_tiny": ((13.23, 1.94), (13.40, 2.03)),
    "acmix_pvt_small": ((24.49, 3.83), (24.83, 3.99)),
}

TINY = dict(
    embed_dims=(16, 32, 48, 64),
    num_heads=(1, 2, 2, 4),
    mlp_ratios=(2, 2, 2, 2),
    depths=(1, 1, 1, 1),
    img_size=64,
    num_classes=10,
)


def _randomise(module: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n.endswith(("rate1", "rate2")):
                continue
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _sra_reference(attn: SRAttention, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """PVT's SRA with an explicit softmax, written from the module's weights."""
    B, T, C = x.shape
    P, N = attn.num_prefix_tokens, attn.num_heads
    d = C // N
    q = x @ attn.q.weight.T + attn.q.bias
    src = x
    if attn.sr is not None:
        grid = x[:, P:].transpose(1, 2).reshape(B, C, H, W)
        s = attn.sr_ratio
        pad_h, pad_w = max(s - H, 0), max(s - W, 0)
        grid = F.pad(grid, (0, pad_w, 0, pad_h))
        red = F.conv2d(grid, attn.sr.weight, attn.sr.bias, stride=s)
        red = red.flatten(2).transpose(1, 2)
        src = F.layer_norm(red, (C,), attn.norm.weight, attn.norm.bias, attn.norm.eps)
    kv = src @ attn.kv.weight.T + attn.kv.bias
    k, v = kv[..., :C], kv[..., C:]
    out = torch.empty_like(q)
    for h in range(N):
        sl = slice(h * d, (h + 1) * d)
        logits = (q[..., sl] @ k[..., sl].transpose(1, 2)) * d**-0.5
        a = torch.exp(logits - logits.amax(-1, keepdim=True))
        out[..., sl] = (a / a.sum(-1, keepdim=True)) @ v[..., sl]
    return out @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize(
    ("sr", "prefix", "hw"),
    [(4, 0, (8, 12)), (2, 0, (5, 7)), (1, 1, (3, 4)), (4, 0, (2, 3))],
)
def test_sra_matches_explicit_softmax(
    backend: str, sr: int, prefix: int, hw: tuple[int, int]
) -> None:
    attn = SRAttention(16, 2, sr, num_prefix_tokens=prefix, paths="attn", backend=backend)
    _randomise(attn)
    attn = attn.double().eval()
    H, W = hw
    x = torch.randn(2, prefix + H * W, 16, dtype=torch.float64)
    with torch.no_grad():
        got = attn(x, H, W)
    torch.testing.assert_close(got, _sra_reference(attn, x, H, W), rtol=0, atol=1e-12)


def _conv_path_by_hand(attn: SRAttention, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """ACmix conv path: [q; nearest-upsampled k, v] -> fc (3N -> 9) -> 3x3 shift-sum."""
    B, T, C = x.shape
    P, N = attn.num_prefix_tokens, attn.num_heads
    d = C // N
    q = (x @ attn.q.weight.T + attn.q.bias)[:, P:].reshape(B, H, W, C)
    if attn.sr is not None:
        grid = x[:, P:].transpose(1, 2).reshape(B, C, H, W)
        red = F.conv2d(grid, attn.sr.weight, attn.sr.bias, stride=attn.sr_ratio)
        Hr, Wr = red.shape[-2:]
        red = F.layer_norm(red.flatten(2).transpose(1, 2), (C,), attn.norm.weight, attn.norm.bias)
        kv = (red @ attn.kv.weight.T + attn.kv.bias).reshape(B, Hr, Wr, 2 * C)
        rows = [i * Hr // H for i in range(H)]  # nearest: source index floor(i * Hr / H)
        cols = [j * Wr // W for j in range(W)]
        kv = kv[:, rows][:, :, cols]
    else:
        kv = (x @ attn.kv.weight.T + attn.kv.bias)[:, P:].reshape(B, H, W, 2 * C)
    heads = torch.cat((q, kv), -1).view(B, H, W, 3 * N, d)  # group which*N + head
    maps = torch.einsum("bhwmd,km->bdkhw", heads, attn.fc.weight.view(9, 3 * N))
    maps = maps + attn.fc.bias.view(1, 1, 9, 1, 1)
    padded = F.pad(maps, (1, 1, 1, 1))
    shifted = sum(padded[:, :, p, p // 3 : p // 3 + H, p % 3 : p % 3 + W] for p in range(9))
    out = shifted.repeat_interleave(C // d, dim=1).flatten(2).transpose(1, 2)  # (B, HW, C)
    return F.pad(out, (0, 0, P, 0))


@pytest.mark.parametrize(("sr", "prefix", "hw"), [(4, 0, (8, 12)), (2, 0, (5, 7)), (1, 1, (3, 4))])
def test_acmix_sra_at_paper_init_with_alpha0_beta1_is_its_conv_path(
    sr: int, prefix: int, hw: tuple[int, int]
) -> None:
    attn = SRAttention(16, 2, sr, num_prefix_tokens=prefix).double().eval()  # paper init
    assert torch.equal(attn.rate1, torch.full((1,), 0.5, dtype=torch.float64))
    with torch.no_grad():
        attn.rate1.fill_(0.0)
        attn.rate2.fill_(1.0)
    H, W = hw
    x = torch.randn(2, prefix + H * W, 16, dtype=torch.float64)
    with torch.no_grad():
        got = attn(x, H, W)
    torch.testing.assert_close(got, _conv_path_by_hand(attn, x, H, W), rtol=0, atol=1e-12)


def test_acmix_sra_with_alpha1_beta0_is_plain_sra() -> None:
    acm = SRAttention(16, 2, 2)
    _randomise(acm)
    acm = acm.double().eval()
    plain = SRAttention(16, 2, 2, paths="attn").double().eval()
    missing, unexpected = plain.load_state_dict(acm.state_dict(), strict=False)
    assert not missing
    assert set(unexpected) == {"fc.weight", "fc.bias", "dep_conv.weight", "rate1", "rate2"}
    with torch.no_grad():
        acm.rate1.fill_(1.0)
        acm.rate2.fill_(0.0)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(acm(x, 4, 5), plain(x, 4, 5), rtol=0, atol=0)


@pytest.mark.parametrize(("sr", "prefix"), [(2, 0), (1, 1)])
def test_acmix_sra_gradcheck(sr: int, prefix: int) -> None:
    attn = SRAttention(8, 2, sr, num_prefix_tokens=prefix)
    _randomise(attn)
    attn = attn.double().eval()
    x = torch.randn(1, prefix + 12, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attn(t, 3, 4), (x,), fast_mode=True)


def test_sra_argument_errors() -> None:
    with pytest.raises(ValueError, match="sr_ratio=1"):
        SRAttention(16, 2, 2, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="divisible by head"):
        SRAttention(16, 3, 2)
    with pytest.raises(ValueError, match="expected x of shape"):
        SRAttention(16, 2, 2)(torch.randn(1, 10, 16), 3, 4)


# -- the network ---------------------------------------------------------------------------


def test_pvt_any_input_from_32_and_too_small_error() -> None:
    model = PyramidVisionTransformer(**TINY).eval()
    with torch.no_grad():
        for size in ((32, 32), (64, 64), (45, 77)):
            out = model(torch.randn(1, 3, *size))
            assert out.shape == (1, 10) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=">= 32"):
        model(torch.randn(1, 3, 28, 64))


def test_map_smaller_than_sr_is_zero_padded() -> None:
    # sr 16 on the first stage's 8x8 map at input 32: one key / value token.
    model = PyramidVisionTransformer(**{**TINY, "sr_ratios": (16, 4, 2, 1)}).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 32, 32))).all()


def test_position_embedding_native_and_interpolated() -> None:
    model = PyramidVisionTransformer(**TINY)
    stage = model.stages[3]  # cls token + 2x2 grid at img_size 64
    assert stage.grid_size == (2, 2) and stage.pos_embed.shape == (1, 5, 64)
    assert stage.position_embedding(2, 2) is stage.pos_embed
    pe = stage.position_embedding(3, 5)
    assert pe.shape == (1, 1 + 15, 64)
    torch.testing.assert_close(pe[:, :1], stage.pos_embed[:, :1])  # class token's untouched
    # A constant table stays constant under bilinear resampling.
    with torch.no_grad():
        stage.pos_embed[:, 1:] = 0.25
    torch.testing.assert_close(stage.position_embedding(3, 5)[:, 1:], torch.full((1, 15, 64), 0.25))


def test_mixer_choices_and_no_weight_decay() -> None:
    for conv_only in ("conv", "acmix_conv"):
        with pytest.raises(ValueError, match=r"not available for PVT.*class token"):
            PyramidVisionTransformer(**TINY, mixer=conv_only)
    plain = PyramidVisionTransformer(**TINY, mixer="attn")
    nwd = plain.no_weight_decay()
    assert nwd == {"stages.0.pos_embed", "stages.1.pos_embed", "stages.2.pos_embed",
                   "stages.3.pos_embed", "stages.3.cls_token"}  # fmt: skip
    acm = PyramidVisionTransformer(**TINY)
    assert {n for n in acm.no_weight_decay() if n.endswith("rate1")}


def test_forward_intermediates_and_head() -> None:
    model = PyramidVisionTransformer(**TINY).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        tokens, feats = model.forward_intermediates(x, norm=True)
        assert [tuple(f.shape) for f in feats] == [
            (2, 16, 16, 24),
            (2, 32, 8, 12),
            (2, 48, 4, 6),
            (2, 64, 2, 3),
        ]
        torch.testing.assert_close(tokens, model.forward_features(x))
        # The last level is the normalised grid tokens (class token dropped).
        grid = tokens[:, 1:].transpose(1, 2).reshape(2, 64, 2, 3)
        torch.testing.assert_close(feats[-1], grid)
        torch.testing.assert_close(model(x), model.head(tokens[:, 0]))
        model.reset_classifier(0, "avg")
        torch.testing.assert_close(model(x), tokens[:, 1:].mean(1))


def _to_pvt_authors_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our keys written the PVT authors' way (classification/pvt.py)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "stages":
            i = int(parts[1]) + 1
            if parts[2] == "blocks":
                k = ".".join([f"block{i}", *parts[3:]])
            elif parts[2] in ("patch_embed", "pos_embed"):
                k = ".".join([f"{parts[2]}{i}", *parts[3:]])
            elif parts[2] == "cls_token":
                k = "cls_token"
        out[k] = v
    return out


def test_checkpoint_filter_maps_the_pvt_authors_layout() -> None:
    src = PyramidVisionTransformer(**TINY, mixer="attn").eval()
    sd = _to_pvt_authors_keys(src.state_dict())
    assert {"patch_embed1.proj.weight", "pos_embed4", "block2.0.attn.sr.weight"} <= set(sd)
    dst = PyramidVisionTransformer(**TINY, mixer="attn").eval()
    dst.load_state_dict(checkpoint_filter_fn({"model": sd}, dst), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # A checkpoint made at another resolution gets its square position tables resampled.
    small = PyramidVisionTransformer(**{**TINY, "img_size": 32}, mixer="attn")
    converted = checkpoint_filter_fn(sd, small)
    small.load_state_dict(converted, strict=True)
    assert converted["stages.3.pos_embed"].shape == (1, 2, 64)


# -- full-size params / MACs ---------------------------------------------------------------


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
    assert (acmix_p, acmix_macs) == (stats.params, stats.macs)

    # The ACmix additions per block: dep_conv 81 C, fc (3N -> 9, bias), alpha / beta;
    # MACs 81 C HW (grouped 3x3 conv) + 27 C HW (fc at full resolution).
    depths = DEPTHS[name]
    add_p = add_m = 0
    for i, (d, c, n) in enumerate(zip(depths, DIMS, HEADS, strict=True)):
        hw = (56 // 2**i) ** 2
        add_p += d * (81 * c + 27 * n + 9 + 2)
        add_m += d * 108 * c * hw
    assert (acmix_p - base_p, acmix_macs - base_macs) == (add_p, add_m)

    (design_base_p, design_base_g), (design_acmix_p, design_acmix_g) = DESIGN[name]
    assert abs(base_p / 1e6 - design_base_p) <= 0.005
    # DESIGN prints PVT-S + ACmix as 24.83M; we build 24.8248M (alpha / beta included).
    assert abs(acmix_p / 1e6 - design_acmix_p) <= 0.006
    # DESIGN's GMACs also count LayerNorms (fvcore); ours leave them out (< 1% apart).
    assert abs(base_macs / 1e9 / design_base_g - 1) <= 0.01
    assert abs(acmix_macs / 1e9 / design_acmix_g - 1) <= 0.01
    # The paper (13M / 2.0G, 25M / 3.9G, to its printed precision): MACs within 5%,
    # params within half a unit of the printed figure.
    assert abs(acmix_macs / stats.paper_macs - 1) <= 0.05
    assert round(acmix_p / 1e6) == round(stats.paper_params / 1e6)


def test_pvt_authors_checkpoint_converts_and_loads_through_timm(tmp_path) -> None:
    from acmix.models.convert import convert_checkpoint

    src = PyramidVisionTransformer(**TINY, mixer="attn").eval()
    path = tmp_path / "pvt_authors.pth"
    torch.save(_to_pvt_authors_keys(src.state_dict()), path)
    dst = tmp_path / "pvt_tiny_tiny.safetensors"
    convert_checkpoint(path, dst, "acmix_pvt_tiny", mixer="attn", **TINY)
    overlay = dict(file=str(dst), num_classes=10)
    model = timm.create_model(
        "acmix_pvt_tiny", pretrained=True, pretrained_cfg_overlay=overlay, mixer="attn", **TINY
    ).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
