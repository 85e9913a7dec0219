"""Swin-ACmix: parity with the authors' code (fixtures 06a/06b/08), checkpoint
conversion of the full-size key lists, costs, padding semantics, timm surface."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import timm.optim
import torch

from acmix.analysis import count_macs, count_params
from acmix.layers import WindowACmix
from acmix.models import MODEL_STATS
from acmix.models.swin import (
    PatchMerging,
    SwinACmixBlock,
    SwinTransformer,
    checkpoint_filter_fn,
    window_attention_mask,
)
from tests.conftest import load_fixture, max_abs

TINY = "acmix_swin_tiny_patch4_window7_224"
SMALL = "acmix_swin_small_patch4_window7_224"
#: Architecture of fixture 08 (the authors' whole model, 154,182 params).
FX08_KWARGS = dict(embed_dim=32, depths=(2, 2), num_heads=(2, 4), img_size=56, num_classes=10)
#: A small 4-stage model for behaviour tests.
SMALL_KWARGS = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)


def _block_from_fixture(fx: dict) -> SwinACmixBlock:
    c = fx["config"]
    block = SwinACmixBlock(
        c["dim"],
        c["num_heads"],
        window_size=c["window_size"],
        shift_size=c["shift_size"],
        mlp_ratio=c["mlp_ratio"],
        qkv_bias=c["qkv_bias"],
    ).double()  # float64 before loading, so that no weight is rounded to float32
    block.load_state_dict(checkpoint_filter_fn(fx["state_dict"], block))
    return block.eval()


# -- parity with the authors' code ---------------------------------------------------------


@pytest.mark.parametrize("case", ["06a_swin_block_shift0", "06b_swin_block_shift3"])
def test_block_matches_authors_block(fixtures_dir: Path, case: str) -> None:
    fx = load_fixture(fixtures_dir, case)
    block = _block_from_fixture(fx)
    H, W = fx["config"]["input_resolution"]
    x = fx["input"].clone().requires_grad_(True)  # (B, H*W, C), the official layout
    out = block(x.view(x.shape[0], H, W, -1)).reshape(x.shape)
    (out * fx["grad_output"]).sum().backward()
    assert max_abs(out, fx["output"]) <= 1e-9
    assert max_abs(x.grad, fx["grad_input"]) <= 1e-9
    params = dict(block.named_parameters())
    assert set(fx["param_grads"]) == set(params)  # every parameter, official names
    for name, grad in fx["param_grads"].items():
        assert max_abs(params[name].grad, grad) <= 1e-9, name


def _create_fx08(fixtures_dir: Path, tmp_path: Path, **overlay) -> tuple[dict, torch.nn.Module]:
    fx = load_fixture(fixtures_dir, "08_acmix_swin_tiny_model")
    assert fx["config"]["embed_dim"] == FX08_KWARGS["embed_dim"]
    ckpt = tmp_path / "acmix_swin_fx08.pth"
    # The authors' checkpoint layout: {'model': state_dict}, attn_mask buffers included.
    torch.save({"model": fx["state_dict"]}, ckpt)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # build in float64: the weights load unrounded
    try:
        model = timm.create_model(
            TINY,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(ckpt), **overlay),
            **FX08_KWARGS,
        )
    finally:
        torch.set_default_dtype(previous)
    return fx, model.eval()


def test_tiny_model_matches_authors_model(fixtures_dir: Path, tmp_path: Path) -> None:
    fx, model = _create_fx08(fixtures_dir, tmp_path)
    assert count_params(model) == fx["num_params"] == 154_182
    # Stage 1 (7x7 tokens) is not larger than the window: one window, no shift.
    assert [b.shift_size for b in model.layers[0].blocks] == [0, 3]
    assert [b.shift_size for b in model.layers[1].blocks] == [0, 0]
    x = fx["input"].clone().requires_grad_(True)
    logits = model(x)
    (logits * fx["grad_output"]).sum().backward()
    assert logits.dtype == torch.float64
    assert max_abs(logits, fx["output"]) <= 1e-8
    assert max_abs(x.grad, fx["grad_input"]) <= 1e-8


def test_tiny_model_from_state_dict_overlay(fixtures_dir: Path) -> None:
    """The in-memory route (``state_dict=``) keeps a matching head too."""
    fx = load_fixture(fixtures_dir, "08_acmix_swin_tiny_model")
    sd = {f"module.{k}": v for k, v in fx["state_dict"].items()}  # DDP-saved keys
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = timm.create_model(
            TINY, pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd), **FX08_KWARGS
        ).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        assert max_abs(model(fx["input"]), fx["output"]) <= 1e-8


def test_pretrained_with_other_num_classes_keeps_backbone(
    fixtures_dir: Path, tmp_path: Path
) -> None:
    """Fine-tuning: a head of another size stays at its init, everything else loads."""
    fx = load_fixture(fixtures_dir, "08_acmix_swin_tiny_model")
    ckpt = tmp_path / "ck.pth"
    torch.save({"model": fx["state_dict"]}, ckpt)
    kwargs = {**FX08_KWARGS, "num_classes": 7}
    model = timm.create_model(
        TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(ckpt)), **kwargs
    )
    assert model.head.weight.shape == (7, 64)
    sd = model.state_dict()
    for key, value in fx["state_dict"].items():
        if key.startswith("head.") or key.endswith("attn_mask"):
            continue
        torch.testing.assert_close(sd[key], value.to(sd[key].dtype), msg=key)
    # Features for detection load the same backbone.
    feats = timm.create_model(
        TINY,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(ckpt)),
        features_only=True,
        **{k: v for k, v in FX08_KWARGS.items() if k != "num_classes"},
    )
    assert [tuple(f.shape) for f in feats(fx["input"].float())] == [(1, 32, 14, 14), (1, 64, 7, 7)]


# -- the authors' full-size checkpoints -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "official"), [(TINY, "acmix_swin_tiny"), (SMALL, "acmix_swin_small")]
)
def test_official_full_size_keys_convert(fixtures_dir: Path, name: str, official: str) -> None:
    spec = json.loads((fixtures_dir / "official_keys" / f"{official}.json").read_text())
    with torch.device("meta"):
        model = timm.create_model(name)
    source = {k: torch.empty(shape, device="meta") for k, shape in spec["state_dict"].items()}
    converted = checkpoint_filter_fn({"model": source}, model)
    assert list(converted) == list(model.state_dict())  # no missing, no unexpected key
    masks = [k for k in spec["state_dict"] if k.endswith("attn_mask")]
    assert masks and not any(k.endswith("attn_mask") for k in converted)
    assert count_params(model) == spec["total_params"] == MODEL_STATS[name].official_params
    model.load_state_dict(converted, assign=True)  # shapes accepted by torch itself


def test_filter_errors_name_the_keys() -> None:
    model = SwinTransformer(**SMALL_KWARGS, img_size=64, num_classes=3)
    sd = model.state_dict()
    bad = dict(sd)
    bad["layers.0.blocks.0.attn.qkv.weight"] = torch.zeros(5, 16)
    with pytest.raises(ValueError, match=r"qkv\.weight: checkpoint \(5, 16\) vs model \(48, 16\)"):
        checkpoint_filter_fn(bad, model)
    missing = {k: v for k, v in sd.items() if "rate1" not in k}
    with pytest.raises(ValueError, match="missing keys"):
        checkpoint_filter_fn(missing, model)
    baseline = SwinTransformer(**SMALL_KWARGS, img_size=64, num_classes=3, mixer="attn")
    with pytest.raises(ValueError, match=r"(?s)mixer='attn'.*unexpected keys.*dep_conv"):
        checkpoint_filter_fn(sd, baseline)
    wrong_index = dict(sd)
    wrong_index["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16).long()
    with pytest.raises(ValueError, match="relative position index"):
        checkpoint_filter_fn(wrong_index, model)
    with pytest.raises(TypeError, match="not a tensor"):
        checkpoint_filter_fn({**sd, "norm.weight": [1.0]}, model)


def test_missing_checkpoint_file_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        timm.create_model(
            TINY,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.pth")),
            **FX08_KWARGS,
        )


# -- costs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "paper_params", "paper_gmacs", "top1"),
    [(TINY, 30e6, 4.6, 81.9), (SMALL, 51e6, 9.0, 83.5)],
)
def test_recorded_costs(name: str, paper_params: float, paper_gmacs: float, top1: float) -> None:
    stats = MODEL_STATS[name]
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    macs = count_macs(model, torch.empty(1, 3, 224, 224, device="meta")).total
    assert macs == stats.macs
    assert abs(macs / (paper_gmacs * 1e9) - 1) <= 0.05
    # The authors' FLOP counting: 4.65G (Swin-T) / 9.00G (Swin-S).
    assert abs(macs / 1e9 - {TINY: 4.65, SMALL: 9.00}[name]) < 0.01
    assert count_params(model) == stats.params == stats.official_params
    assert (stats.paper_params, stats.paper_macs, stats.paper_top1) == (
        paper_params,
        paper_gmacs * 1e9,
        top1,
    )


def test_attn_mixer_is_plain_swin_t() -> None:
    """The baseline from the same code has exactly Microsoft Swin-T's parameters."""
    with torch.device("meta"):
        model = timm.create_model(TINY, mixer="attn").eval()
    assert count_params(model) == 28_288_354
    assert not any(k.endswith(("rate1", "rate2")) or ".fc." in k for k in model.state_dict())
    macs = count_macs(model, torch.empty(1, 3, 224, 224, device="meta")).total
    assert abs(macs / 4.5e9 - 1) < 0.01  # Swin paper: 4.5G
    # ACmix adds fc + dep_conv: (27 + 81) * C * H * W MACs per block at its stage size.
    conv_path = sum(108 * (96 * 2**i) * (56 // 2**i) ** 2 * d for i, d in enumerate((2, 2, 6, 2)))
    assert MODEL_STATS[TINY].macs - macs == conv_path


# -- windows, masks and padding -------------------------------------------------------------


def _brute_force_mask(H: int, W: int, window: int, shift: int) -> torch.Tensor:
    """Swin's rule token by token: same region -> 0, else -100, on the padded, rolled map.

    A token of the rolled map at ``(r, c)`` came from ``((r + shift) % Hp, (c + shift) %
    Wp)``; it is padding if that lies outside ``H x W``, and otherwise in the shifted
    region given by the bands ``[0, -window), [-window, -shift), [-shift, end)`` of its
    row and column (one region without shift). All padded tokens form one region.
    """
    Hp, Wp = math.ceil(H / window) * window, math.ceil(W / window) * window

    def band(v: int, n: int) -> int:
        return 0 if shift == 0 or v < n - window else (1 if v < n - shift else 2)

    def region(r: int, c: int) -> tuple[int, int] | str:
        if (r + shift) % Hp >= H or (c + shift) % Wp >= W:
            return "pad"
        return (band(r, Hp), band(c, Wp))

    masks = []
    for wr in range(Hp // window):
        for wc in range(Wp // window):
            tokens = [
                region(wr * window + i, wc * window + j)
                for i in range(window)
                for j in range(window)
            ]
            masks.append([[0.0 if a == b else -100.0 for b in tokens] for a in tokens])
    return torch.tensor(masks)


@pytest.mark.parametrize(
    ("H", "W", "window", "shift"),
    [(14, 14, 7, 3), (8, 8, 4, 2), (9, 6, 4, 2), (9, 6, 4, 0), (5, 11, 3, 1), (7, 7, 7, 3)],
)
def test_mask_is_swin_rule_with_padding_region(H: int, W: int, window: int, shift: int) -> None:
    ours = window_attention_mask(H, W, window, shift)
    assert ours is not None and ours.dtype == torch.float32
    assert torch.equal(ours, _brute_force_mask(H, W, window, shift))


def test_mask_none_without_shift_or_padding() -> None:
    assert window_attention_mask(14, 14, 7, 0) is None
    assert window_attention_mask(8, 12, 4, 0) is None


def _brute_force_window_attention(layer: WindowACmix, x: torch.Tensor, w: int) -> torch.Tensor:
    """Per-token softmax over the *real* tokens of the token's w x w window (no shift)."""
    B, H, W, C = x.shape
    N = layer.num_heads
    d = C // N
    q, k, v = layer.qkv(x).split(C, dim=-1)
    table = layer.relative_position_bias_table
    out = torch.zeros_like(x)
    for i in range(H):
        for j in range(W):
            keys = [
                (a, b)
                for a in range((i // w) * w, min((i // w + 1) * w, H))
                for b in range((j // w) * w, min((j // w + 1) * w, W))
            ]
            for h in range(N):
                hs = slice(h * d, (h + 1) * d)
                logits = torch.stack(
                    [
                        (q[:, i, j, hs] * layer.scale * k[:, a, b, hs]).sum(-1)
                        + table[(i - a + w - 1) * (2 * w - 1) + (j - b + w - 1), h]
                        for a, b in keys
                    ],
                    dim=-1,
                )
                att = logits.softmax(-1)  # (B, n_keys)
                vals = torch.stack([v[:, a, b, hs] for a, b in keys], dim=1)  # (B, n, d)
                out[:, i, j, hs] = (att.unsqueeze(-1) * vals).sum(1)
    return layer.proj(out)


def test_padded_block_attends_to_real_tokens_only() -> None:
    """A 9x6 map with window 4 (padded to 12x8): hand-computed truth, pad keys excluded."""
    torch.manual_seed(0)
    block = SwinACmixBlock(8, 2, window_size=4, shift_size=0, mixer="attn").double().eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 9, 6, 8, dtype=torch.float64)
    truth = _brute_force_window_attention(block.attn, x, 4)
    assert max_abs(block._mix(x), truth) <= 1e-12


def test_padded_conv_path_is_local() -> None:
    """Without shift, the conv path on the padded map equals the conv path on the real
    map except next to the padding (one pixel for kernel_conv 3), where it sees zero
    tokens (whose q, k, v are the qkv biases) instead of zero features."""
    torch.manual_seed(0)
    block = SwinACmixBlock(8, 2, window_size=4, shift_size=0, mixer="acmix_conv").double().eval()
    x = torch.randn(1, 9, 7, 8, dtype=torch.float64)
    padded, real = block._mix(x), block.attn(x, None)
    assert max_abs(padded[:, :-1, :-1], real[:, :-1, :-1]) <= 1e-12
    assert max_abs(padded[:, -1], real[:, -1]) > 1e-6


def test_shifted_padded_mask_ignores_pad_content() -> None:
    """With shift and padding, what the padded tokens hold never reaches a real token."""
    torch.manual_seed(0)
    attn = WindowACmix(8, 4, 2, paths="attn").double().eval()
    H, W, ws, shift = 9, 6, 4, 2
    mask = window_attention_mask(H, W, ws, shift)
    padded = torch.zeros(1, 12, 8, 8, dtype=torch.float64)
    padded[:, :H, :W] = torch.randn(1, H, W, 8, dtype=torch.float64)
    junk = padded.clone()
    junk[:, H:], junk[:, :, W:] = 5.0, -3.0
    outs = []
    for m in (padded, junk):
        rolled = torch.roll(m, (-shift, -shift), (1, 2))
        outs.append(torch.roll(attn(rolled, mask), (shift, shift), (1, 2))[:, :H, :W])
    assert max_abs(outs[0], outs[1]) <= 1e-12


def test_shift_switched_off_on_maps_not_larger_than_the_window() -> None:
    torch.manual_seed(0)
    shifted = SwinACmixBlock(8, 2, window_size=7, shift_size=3).double().eval()
    plain = SwinACmixBlock(8, 2, window_size=7, shift_size=0).double().eval()
    plain.load_state_dict(shifted.state_dict())
    x = torch.randn(1, 5, 7, 8, dtype=torch.float64)
    assert max_abs(shifted(x), plain(x)) == 0.0
    y = torch.randn(1, 8, 8, 8, dtype=torch.float64)  # larger: shifted, so it differs
    assert max_abs(shifted(y), plain(y)) > 1e-6


def test_windows_follow_the_official_small_map_rule() -> None:
    model = SwinTransformer(**SMALL_KWARGS, img_size=64)  # stages at 16, 8, 4, 2 tokens
    windows = [[(b.window_size, b.shift_size) for b in s.blocks] for s in model.layers]
    assert windows == [[(4, 0), (4, 2)], [(4, 0), (4, 2)], [(4, 0), (4, 0)], [(2, 0), (2, 0)]]
    assert not any("attn_mask" in k for k in model.state_dict())  # masks are not state


def test_patch_merging_official_order() -> None:
    """Channels are [x(0::2, 0::2), x(1::2, 0::2), x(0::2, 1::2), x(1::2, 1::2)]."""
    merge = PatchMerging(3).double()
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.eye(6, 12, dtype=torch.float64))
    merge.norm = torch.nn.Identity()
    x = torch.randn(2, 4, 6, 3, dtype=torch.float64)
    out = merge(x)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    assert max_abs(out, cat[..., :6]) == 0.0
    assert merge(torch.randn(1, 5, 3, 3, dtype=torch.float64)).shape == (1, 3, 2, 6)


@pytest.mark.parametrize("size", [(64, 64), (96, 80), (50, 37), (224, 224)])
def test_any_input_size(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        TINY, embed_dim=8, depths=(1, 2, 1, 1), num_heads=(1, 1, 2, 2), num_classes=4
    )
    x = torch.randn(1, 3, *size)
    out = model(x)
    assert out.shape == (1, 4) and torch.isfinite(out).all()
    out.sum().backward()
    feats = model.forward_intermediates(x, intermediates_only=True)
    expected = [
        (1, 8 * 2**i, math.ceil(size[0] / 4 / 2**i), math.ceil(size[1] / 4 / 2**i))
        for i in range(4)
    ]
    assert [tuple(f.shape) for f in feats] == expected


# -- timm surface ----------------------------------------------------------------------------


def test_features_only_are_stage_maps_before_downsample() -> None:
    torch.manual_seed(0)
    model = timm.create_model(TINY, **SMALL_KWARGS, img_size=64).eval()
    feats = timm.create_model(TINY, **SMALL_KWARGS, img_size=64, features_only=True).eval()
    feats.model.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = feats(x)
        y = model.patch_embed(x)
        for i, stage in enumerate(model.layers):
            y = stage.forward_blocks(y)
            torch.testing.assert_close(outs[i], y.permute(0, 3, 1, 2))  # NCHW
            y = stage.downsample(y)
        final, inter = model.forward_intermediates(x, indices=[1, 3], output_fmt="NHWC")
    torch.testing.assert_close(final, model.forward_features(x))
    torch.testing.assert_close(inter[1].permute(0, 3, 1, 2), outs[3])
    two = timm.create_model(TINY, **SMALL_KWARGS, features_only=True, out_indices=(1, 2))
    assert two.feature_info.reduction() == [8, 16]
    assert len(two.model.layers) == 3  # stages after the last requested one are pruned


def test_pretrained_cfg_and_weight_decay() -> None:
    model = timm.create_model(TINY, **SMALL_KWARGS)
    cfg = model.pretrained_cfg
    assert cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["input_size"] == (3, 224, 224)
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406)
    assert tuple(cfg["std"]) == (0.229, 0.224, 0.225)
    params = [n for n, _ in model.named_parameters()]
    expected = {n for n in params if n.endswith(("bias_table", "rate1", "rate2"))}
    assert len(expected) == 3 * sum(SMALL_KWARGS["depths"])
    assert model.no_weight_decay() == expected
    groups = timm.optim.create_optimizer_v2(model, "adamw", weight_decay=0.05).param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(model.named_parameters())
    assert all(id(named[n]) in no_decay for n in expected)


def test_drop_path_and_grad_checkpointing_train() -> None:
    """Stochastic depth is active in training; checkpointing reproduces it (same RNG)."""
    model = timm.create_model(TINY, **SMALL_KWARGS, drop_path_rate=0.5, num_classes=3).train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert max_abs(model(x), a) > 0  # different paths dropped
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    b = model(x)
    b.sum().backward()
    torch.testing.assert_close(b, a)


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="mixer must be one of"):
        timm.create_model(TINY, mixer="conv3x3")
    with pytest.raises(ValueError, match="one entry per stage"):
        SwinTransformer(depths=(2, 2), num_heads=(1, 2, 4))
    with pytest.raises(ValueError, match="divisible"):
        SwinTransformer(embed_dim=16, depths=(1,), num_heads=(3,))
    with pytest.raises(ValueError, match="shift_size"):
        SwinACmixBlock(8, 2, window_size=4, shift_size=4)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        SwinTransformer(**SMALL_KWARGS)(torch.randn(3, 32, 32))
