"""ACmix ResNets: parity with the authors' model (fixture 07), their full-size key lists,
the checkpoint filter, input sizes, init modes and the same-code baselines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import acmix  # noqa: F401  (registers the models)
from acmix.analysis import count_params
from acmix.layers import ACmix, shift_kernel
from acmix.models.resnet import ResNet, checkpoint_filter_fn
from tests.conftest import load_fixture, max_abs
from tests.fixtures_util import authors_resnet_checkpoint, regenerate_state_dict

FIXTURE = "07_acmix_resnet_tiny_model"
TINY = dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)


@pytest.fixture(scope="module")
def fx07(fixtures_dir: Path) -> dict:
    return load_fixture(fixtures_dir, FIXTURE)


@pytest.fixture(scope="module")
def sd07(fx07: dict) -> dict[str, torch.Tensor]:
    return regenerate_state_dict(fx07)


def _create_float64(name: str, **kwargs) -> torch.nn.Module:
    """Build (and load) in float64 so float64 weights are not rounded through float32."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return timm.create_model(name, **kwargs)
    finally:
        torch.set_default_dtype(default)


def _save(sd: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    if fmt == "authors_pth":
        torch.save(authors_resnet_checkpoint(sd), path)
    elif fmt == "model_pt":
        torch.save({"model": sd}, path)
    else:
        save_file(sd, str(path))


# -- parity with the authors' code ----------------------------------------------------------


def test_regenerated_weights_match_fixture_sums(fx07: dict, sd07: dict) -> None:
    assert sd07.keys() == fx07["state_dict_shapes"].keys()
    for k, total in fx07["state_dict_sums"].items():
        assert abs(sd07[k].double().sum().item() - total) <= 1e-9 * max(1.0, abs(total)), k


@pytest.mark.parametrize(
    ("fmt", "suffix"),
    [("authors_pth", ".pth"), ("model_pt", ".pt"), ("safetensors", ".safetensors")],
)
def test_fixture07_parity_through_pretrained_file(
    fx07: dict, sd07: dict, tmp_path: Path, fmt: str, suffix: str
) -> None:
    path = tmp_path / f"acmix_tiny{suffix}"
    _save(sd07, path, fmt)
    model = _create_float64(
        "acmix_resnet26",
        layers=(1, 1, 1, 1),
        num_classes=10,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(path)),
    ).eval()
    assert count_params(model) == fx07["num_params"]
    # Loaded exactly: every entry equals the regenerated weight bit for bit.
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd07[k]), k
    x = fx07["input"].clone().requires_grad_(True)
    out = model(x)
    assert out.dtype == torch.float64
    assert max_abs(out, fx07["output"]) <= 1e-8
    (out * fx07["grad_output"]).sum().backward()
    if fx07.get("grad_input") is not None:
        assert max_abs(x.grad, fx07["grad_input"]) <= 1e-8


@pytest.mark.parametrize("name", ["acmix_resnet26", "acmix_resnet38", "acmix_resnet50"])
def test_official_full_size_keys_convert_and_load_strict(fixtures_dir: Path, name: str) -> None:
    spec = json.loads((fixtures_dir / "official_keys" / f"{name}.json").read_text())
    dtypes = {k: getattr(torch, v) for k, v in spec["non_float_keys"].items()}
    official = {
        k: torch.zeros(shape, dtype=dtypes.get(k, torch.float32))
        for k, shape in spec["state_dict"].items()
    }
    with torch.device("meta"):
        model = timm.create_model(name)
    assert set(model.state_dict()) == set(official)
    sd = checkpoint_filter_fn({"state_dict": official}, model)
    result = model.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert count_params(model) == spec["total_params"]
    for top, n in spec["params_by_top_module"].items():
        assert count_params(model.get_submodule(top)) == n, top


# -- checkpoint filter -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> ResNet:
    torch.manual_seed(0)
    return timm.create_model("acmix_resnet26", **TINY).eval()


def test_filter_unwraps_strips_prefix_and_drops_stray_dep_conv_bias(tiny_model: ResNet) -> None:
    sd = tiny_model.state_dict()
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    wrapped["module.layer1.0.conv2.dep_conv.bias"] = torch.zeros(32)
    for container in ({"state_dict": wrapped}, {"model": wrapped}, wrapped):
        out = checkpoint_filter_fn(container, tiny_model)
        assert out.keys() == sd.keys()
        assert all(out[k] is sd[k] for k in sd)


def test_filter_shape_mismatch_names_key_and_shapes(tiny_model: ResNet) -> None:
    sd = dict(tiny_model.state_dict())
    sd["layer2.0.conv2.fc.weight"] = torch.zeros(25, 12, 1, 1)  # kernel_conv 5 checkpoint
    with pytest.raises(
        ValueError, match=r"layer2\.0\.conv2\.fc\.weight.*\(25, 12, 1, 1\).*\(9, 12, 1, 1\)"
    ):
        checkpoint_filter_fn(sd, tiny_model)


def test_filter_rejects_non_state_dicts(tiny_model: ResNet) -> None:
    with pytest.raises(ValueError, match="not a state dict"):
        checkpoint_filter_fn({"epoch": 3, "arch": "resnet"}, tiny_model)
    with pytest.raises(ValueError, match="not a state dict"):
        checkpoint_filter_fn({"state_dict": {"conv1.weight": [1.0, 2.0]}}, tiny_model)


def test_new_head_from_checkpoint_with_another_head(tiny_model: ResNet, tmp_path: Path) -> None:
    path = tmp_path / "ten_classes.pth"
    torch.save({"state_dict": tiny_model.state_dict()}, path)
    kwargs = dict(TINY, num_classes=5, pretrained=True)
    # A file is taken to have the model's head: a clear error names the classifier ...
    with pytest.raises(ValueError, match=r"fc\.weight.*\(10, 256\).*\(5, 256\)"):
        timm.create_model("acmix_resnet26", **kwargs, pretrained_cfg_overlay=dict(file=str(path)))
    # ... unless its class count is stated: timm then loads the backbone, new head.
    model = timm.create_model(
        "acmix_resnet26", **kwargs, pretrained_cfg_overlay=dict(file=str(path), num_classes=10)
    )
    assert model.fc.out_features == 5
    src = tiny_model.state_dict()
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, src[k]), k


def test_pretrained_without_a_file_says_no_weights() -> None:
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model("acmix_resnet26", pretrained=True, **TINY)


# -- README behaviours -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "kwargs"),
    [((32, 32), {}), ((33, 47), {}), ((224, 224), dict(widths=(8, 16, 32, 64)))],
)
def test_input_sizes(size: tuple[int, int], kwargs: dict) -> None:
    """Any size >= 32: late 1x1 / 2x2 maps use masked padding, odd sizes round up."""
    model = timm.create_model("acmix_resnet26", layers=(1, 1, 2, 1), num_classes=10, **kwargs)
    model.eval()
    H, W = size
    x = torch.randn(1, 3, H, W)
    with torch.no_grad():
        out = model(x)
        stages = model.forward_intermediates(x, intermediates_only=True)
    assert out.shape == (1, 10) and torch.isfinite(out).all()
    for feat, info in zip(stages, model.feature_info, strict=True):
        r = info["reduction"]
        assert feat.shape == (1, info["num_chs"], math.ceil(H / r), math.ceil(W / r))


def test_authors_reflect_padding_fails_on_tiny_maps_with_a_clear_error() -> None:
    model = timm.create_model("acmix_resnet26", **TINY, padding_mode="reflect").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # late maps 4x4: reflection still fits
        with pytest.raises(ValueError, match="too small for reflection padding"):
            model(torch.randn(1, 3, 32, 32))  # stage 4 runs on 2x2


def test_auto_padding_reflects_where_it_fits() -> None:
    """At 64x64 every ACmix map is >= 4x4: "auto" computes the authors' reflect model."""
    torch.manual_seed(0)
    auto = timm.create_model("acmix_resnet26", **TINY).eval()
    reflect = timm.create_model("acmix_resnet26", **TINY, padding_mode="reflect").eval()
    reflect.load_state_dict(auto.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(auto(x), reflect(x), rtol=0, atol=0)


def test_init_official_vs_paper_differ_only_in_dep_conv() -> None:
    states = {}
    for init in ("paper", "official"):
        torch.manual_seed(0)
        states[init] = timm.create_model("acmix_resnet26", **TINY, init=init).state_dict()
    paper, official = states["paper"], states["official"]
    differ = {k for k in paper if not torch.equal(paper[k], official[k])}
    dep_convs = {k for k in paper if k.endswith("dep_conv.weight")}
    assert differ == dep_convs
    for k in dep_convs:
        assert torch.equal(paper[k], shift_kernel(paper[k].shape[0], 3)), k
        # official: Kaiming-normal fan-out (std sqrt(2 / (C_out * 9 / groups)) ), not one-hot
        assert (official[k] != 0).float().mean() > 0.9, k
    assert all(torch.equal(paper[k], torch.full((1,), 0.5)) for k in paper if "rate" in k)
    # the layers record the scheme, so their own reset_parameters() reproduces it
    torch.manual_seed(0)
    model = timm.create_model("acmix_resnet26", **TINY, init="official")
    assert {m.init_mode for m in model.modules() if isinstance(m, ACmix)} == {"official"}


def test_baselines_from_the_same_code() -> None:
    """mixer="conv" is torchvision's ResNet-50; mixer="attn" drops the conv path."""
    with torch.device("meta"):
        conv = timm.create_model("acmix_resnet50", mixer="conv")
        attn = timm.create_model("acmix_resnet26", mixer="attn")
    assert count_params(conv) == 25_557_032  # torchvision resnet50
    assert isinstance(conv.layer1[0].conv2, torch.nn.Conv2d)
    keys = list(attn.state_dict())
    assert not [
        k
        for k in keys
        if k.endswith(("fc.weight", "dep_conv.weight", "rate1")) and k.startswith("layer")
    ]
    assert any(k.endswith("conv_p.weight") for k in keys)


def test_no_weight_decay_is_alpha_beta() -> None:
    model = timm.create_model("acmix_resnet26", **TINY)
    assert model.no_weight_decay() == {
        f"layer{i}.0.conv2.rate{j}" for i in range(1, 5) for j in (1, 2)
    }


def test_pretrained_cfg_values() -> None:
    cfg = timm.create_model("acmix_resnet50", **TINY).pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bilinear"
    assert cfg["pool_size"] == (7, 7)
    assert tuple(cfg["mean"]) == (0.485, 0.456, 0.406)
    assert tuple(cfg["std"]) == (0.229, 0.224, 0.225)
    assert (cfg["first_conv"], cfg["classifier"]) == ("conv1", "fc")


def test_drop_path_schedule_and_validation() -> None:
    model = timm.create_model("acmix_resnet26", **TINY, drop_path_rate=0.3)
    rates = [
        b.drop_path.drop_prob if hasattr(b.drop_path, "drop_prob") else 0.0
        for s in (model.layer1, model.layer2, model.layer3, model.layer4)
        for b in s
    ]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="layers must be 4"):
        timm.create_model("acmix_resnet26", layers=(1, 1, 1))
    with pytest.raises(ValueError, match="mixer"):
        timm.create_model("acmix_resnet26", **TINY, mixer="sasa")
