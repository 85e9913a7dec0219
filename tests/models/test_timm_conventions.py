"""timm's model conventions, checked over the whole ``acmix_*`` registry.

What timm's own registry-wide tests ask of a model, at each family's tiny test
config (``acmix.models.TEST_CONFIGS``) so that the file stays quick on a CPU:

* ``reset_classifier(0, "")``: no classifier and no pooling, so ``forward``
  returns the unpooled output in the family's format (``model.output_fmt``):
  NCHW maps for the convnets, NHWC for Swin (as timm's Swin), the normalised
  token sequence for PVT (class token first, as timm's class-token ViTs);
* ``reset_classifier(0)`` / ``num_classes=0``: pooled ``(B, num_features)``;
* a complete pretrained cfg whose ``pool_size`` is the unpooled map at its
  ``input_size`` (``None`` for a token output, as timm's class-token models);
* ``forward_intermediates`` / ``prune_intermediate_layers`` with timm's
  semantics, and ``features_only=True`` (timm's ``FeatureGetterNet`` over them)
  agreeing with both and with ``feature_info``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from torch import nn

import acmix  # noqa: F401  (registers the models)
from acmix.models import TEST_CONFIGS

NAMES = timm.list_models("acmix_*")

#: Every key of a complete pretrained cfg (``pool_size`` may be ``None`` for tokens).
CFG_KEYS = (
    "input_size",
    "pool_size",
    "crop_pct",
    "interpolation",
    "mean",
    "std",
    "first_conv",
    "classifier",
    "num_classes",
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the test models are tiny, and on a shared 2-core machine
    two spinning OpenMP threads make each forward up to ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _create(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**TEST_CONFIGS[name].kwargs, **kwargs}).eval()


def _input(name: str, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, *TEST_CONFIGS[name].input_size)


def _fmt(model: nn.Module) -> str:
    return str(getattr(model, "output_fmt", "NCHW"))


def _grid(size: tuple[int, ...], reduction: int) -> tuple[int, int]:
    return math.ceil(size[-2] / reduction), math.ceil(size[-1] / reduction)


def _unpooled_shape(model: nn.Module, x_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The family's unpooled output for an input of ``x_shape``, from ``feature_info``."""
    B, C = x_shape[0], model.num_features
    h, w = _grid(x_shape, model.feature_info[-1]["reduction"])
    fmt = _fmt(model)
    if fmt == "NLC":
        return (B, model.num_prefix_tokens + h * w, C)
    return (B, h, w, C) if fmt == "NHWC" else (B, C, h, w)


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_no_pool_gives_unpooled_output(name: str) -> None:
    model = _create(name)
    x = _input(name)
    with torch.no_grad():
        feats = model.forward_features(x)
    model.reset_classifier(0, "")
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model.num_classes == 0
    with torch.no_grad():
        out = model(x)
    assert tuple(out.shape) == _unpooled_shape(model, tuple(x.shape))
    # Unpooled means exactly the features: nothing pooled, flattened or dropped.
    assert torch.equal(out, feats)
    # The channel axis timm reads from output_fmt holds num_features (NLC: the last).
    assert out.shape[get_channel_dim(_fmt(model))] == model.num_features


@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier_keeps_pooling_by_default(name: str) -> None:
    model = _create(name)
    x = _input(name)
    with torch.no_grad():
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        out = model(x)
    assert tuple(out.shape) == (2, model.num_features) == tuple(pre.shape)
    assert out.shape[1] == model.head_hidden_size
    torch.testing.assert_close(out, pre, rtol=0, atol=0)
    # Restoring pooling after removing it.
    model.reset_classifier(0, "")
    model.reset_classifier(3, "avg")
    with torch.no_grad():
        assert tuple(model(x).shape) == (2, 3)
    headless = _create(name, num_classes=0)
    with torch.no_grad():
        assert tuple(headless(x).shape) == (2, headless.head_hidden_size)


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg_is_complete(name: str) -> None:
    model = _create(name)
    cfg = model.pretrained_cfg
    missing = [k for k in CFG_KEYS if k not in cfg]
    assert not missing, f"pretrained_cfg lacks {missing}"
    for key in CFG_KEYS:
        if key != "pool_size":
            assert cfg[key] is not None, f"pretrained_cfg[{key!r}] is None"
    assert len(cfg["input_size"]) == 3 and len(cfg["mean"]) == len(cfg["std"]) == 3
    if _fmt(model) == "NLC":
        assert cfg["pool_size"] is None  # a token output: timm's class-token declaration
    else:
        assert len(cfg["pool_size"]) == 2
    state = model.state_dict()
    assert cfg["first_conv"] + ".weight" in state
    assert isinstance(model.get_submodule(cfg["first_conv"]), nn.Conv2d)
    assert cfg["classifier"] + ".weight" in state
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    # Same cfg as the full-size model's (the test config only shrinks the network).
    assert model.pretrained_cfg == timm.models.get_pretrained_cfg(name).to_dict()


@pytest.mark.parametrize("name", NAMES)
def test_pool_size_is_the_unpooled_map_at_input_size(name: str) -> None:
    """The full-size model, on the meta device, at the cfg's input size."""
    with torch.device("meta"):
        model = timm.create_model(name)
    model.eval().reset_classifier(0, "")
    cfg = model.pretrained_cfg
    x = torch.empty(1, *cfg["input_size"], device="meta")
    with torch.no_grad():
        out = model(x)
    assert tuple(out.shape) == _unpooled_shape(model, tuple(x.shape))
    if cfg["pool_size"] is not None:
        spatial = get_spatial_dim(_fmt(model))
        assert tuple(out.shape[d] for d in spatial) == tuple(cfg["pool_size"])


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_contract(name: str) -> None:
    model = _create(name)
    x = _input(name)
    info = model.feature_info
    n = len(info)
    with torch.no_grad():
        feats = model.forward_features(x)
        final, inter = model.forward_intermediates(x)
        only = model.forward_intermediates(x, intermediates_only=True)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        neg = model.forward_intermediates(x, indices=[-1, 0], intermediates_only=True)
        early = model.forward_intermediates(x, indices=[0], stop_early=True)
    assert torch.equal(final, feats)  # the final output is forward_features'
    assert len(inter) == n == len(only)
    for o, f, i in zip(inter, only, info, strict=True):
        assert torch.equal(o, f)
        assert tuple(o.shape) == (2, i["num_chs"], *_grid(tuple(x.shape), i["reduction"]))
    assert len(last2) == 2 and all(
        torch.equal(a, b) for a, b in zip(last2, inter[-2:], strict=True)
    )
    # Indices are taken in increasing order, whatever order they are given in.
    assert len(neg) == 2
    assert torch.equal(neg[0], inter[0]) and torch.equal(neg[1], inter[-1])
    early_final, early_inter = early
    assert len(early_inter) == 1 and torch.equal(early_inter[0], inter[0])
    assert early_final.shape[0] == 2
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NCL")


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates_with_grad_checkpointing(name: str) -> None:
    model = _create(name)
    x = _input(name)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        model.set_grad_checkpointing(True)
        final_ckpt, inter_ckpt = model.forward_intermediates(x)
    torch.testing.assert_close(final_ckpt, final, rtol=1e-5, atol=1e-6)
    for a, b in zip(inter_ckpt, inter, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_norm_applies_to_the_last_level_only(name: str) -> None:
    model = _create(name)
    x = _input(name)
    with torch.no_grad():
        plain = model.forward_intermediates(x, intermediates_only=True)
        normed = model.forward_intermediates(x, norm=True, intermediates_only=True)
    for a, b in zip(plain[:-1], normed[:-1], strict=True):
        assert torch.equal(a, b)
    assert normed[-1].shape == plain[-1].shape


def _absolute(indices: int | tuple[int, ...] | list[int], n: int) -> list[int]:
    """timm's reading of ``indices``: an int is the last ``n``, negatives count from the end."""
    if isinstance(indices, int):
        return list(range(n - indices, n))
    return [i % n for i in indices]


@pytest.mark.parametrize(
    "indices", [1, 2, (0, 1), (1,), [-2]], ids=["last", "last2", "0-1", "1", "neg2"]
)
@pytest.mark.parametrize("name", NAMES)
def test_prune_keeps_requested_outputs(name: str, indices: int | tuple[int, ...]) -> None:
    model = _create(name)
    x = _input(name)
    n = len(model.feature_info)
    with torch.no_grad():
        full = model.forward_intermediates(x, intermediates_only=True)
    pruned = copy.deepcopy(model)
    take = pruned.prune_intermediate_layers(indices)
    assert list(take) == _absolute(indices, n)
    assert isinstance(pruned.get_classifier(), nn.Identity)
    with torch.no_grad():
        out = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
    assert len(out) == len(take)
    for o, i in zip(out, take, strict=True):
        assert torch.equal(o, full[i]), f"level {i} changed by pruning"
    n_full = sum(p.numel() for p in model.parameters())
    n_pruned = sum(p.numel() for p in pruned.parameters())
    if max(take) < n - 1:
        assert n_pruned < n_full, "pruning left the unused stages in place"
    # The pruned model's state is the full model's, key for key, minus what was dropped.
    full_sd = model.state_dict()
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, full_sd[k])


@pytest.mark.parametrize("out_indices", [None, (1, 3), (2,)], ids=["all", "1-3", "2"])
@pytest.mark.parametrize("name", NAMES)
def test_features_only_is_forward_intermediates(
    name: str, out_indices: tuple[int, ...] | None
) -> None:
    model = _create(name)
    x = _input(name)
    kwargs: dict[str, object] = {"features_only": True}
    if out_indices is not None:
        kwargs["out_indices"] = out_indices
    feats = _create(name, **kwargs)
    assert type(feats).__name__ == "FeatureGetterNet"
    wanted = list(out_indices) if out_indices is not None else list(range(len(model.feature_info)))
    # Same weights as the full model (the extractor holds the pruned model).
    own = feats.model.state_dict()
    full_sd = model.state_dict()
    feats.model.load_state_dict({k: full_sd[k] for k in own})
    info = feats.feature_info
    assert info.channels() == [model.feature_info[i]["num_chs"] for i in wanted]
    assert info.reduction() == [model.feature_info[i]["reduction"] for i in wanted]
    with torch.no_grad():
        outs = feats(x)
        ref = model.forward_intermediates(x, indices=wanted, intermediates_only=True)
    assert len(outs) == len(wanted) == len(ref)
    for o, r, c, red in zip(outs, ref, info.channels(), info.reduction(), strict=True):
        assert tuple(o.shape) == (2, c, *_grid(tuple(x.shape), red))  # NCHW
        assert torch.equal(o, r)
