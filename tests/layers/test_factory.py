"""The mixer vocabulary: one name, one meaning, in every family; callables; ConvPathConfig."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import pytest
import timm
import torch
from torch import nn

import acmix  # noqa: F401  (registers the models)
from acmix.layers import (
    MIXER_PATHS,
    MIXERS,
    ACmix,
    ACmixBase,
    ConvPathConfig,
    create_mixer,
    resolve_mixer,
)
from acmix.models import TEST_CONFIGS
from acmix.models.pvt import PVTBlock, PyramidVisionTransformer
from acmix.models.resnet import Bottleneck, ResNet
from acmix.models.san import SAN, SANBlock
from acmix.models.swin import SwinACmixBlock, SwinTransformer
from acmix.models.tiny import TinyBlock, TinyNet

SWIN = "acmix_swin_tiny_patch4_window7_224"

#: One variant per family -> (its block class, the block attribute holding the mixer).
FAMILIES: dict[str, tuple[type[nn.Module], str]] = {
    "acmix_resnet26": (Bottleneck, "conv2"),
    "acmix_tiny": (TinyBlock, "mixer"),
    "acmix_san10": (SANBlock, "sam"),
    "acmix_pvt_tiny": (PVTBlock, "attn"),
    SWIN: (SwinACmixBlock, "attn"),
}

#: The names a family does not offer (PVT reads a class token off the grid).
UNAVAILABLE: dict[str, tuple[str, ...]] = {"acmix_pvt_tiny": ("conv", "acmix_conv")}

CASES = [
    (name, mixer) for name in FAMILIES for mixer in MIXERS if mixer not in UNAVAILABLE.get(name, ())
]


def _build(name: str, **kwargs: object) -> nn.Module:
    cfg = TEST_CONFIGS[name]
    return timm.create_model(name, **{**cfg.kwargs, **kwargs})


def _mixers(model: nn.Module, name: str) -> list[nn.Module]:
    block_cls, attr = FAMILIES[name]
    found = [getattr(b, attr) for b in model.modules() if isinstance(b, block_cls)]
    assert found, f"no {block_cls.__name__} in {name}"
    return found


def _forward(model: nn.Module, name: str) -> torch.Tensor:
    x = torch.randn(2, *TEST_CONFIGS[name].input_size)
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize(("name", "mixer"), CASES)
def test_one_name_one_kind_in_every_family(name: str, mixer: str) -> None:
    """The same name builds the same kind of module wherever it is offered."""
    model = _build(name, mixer=mixer, conv_path={"kernel_conv": 5})
    mixers = _mixers(model, name)
    for m in mixers:
        if mixer == "conv":
            # The plain k x k convolution: a dense nn.Conv2d, nothing of ACmix.
            assert isinstance(m, nn.Conv2d) and m.kernel_size == (5, 5) and m.groups == 1
        else:
            assert isinstance(m, ACmixBase) and m.paths == MIXER_PATHS[mixer]
            assert m.kernel_conv == 5
            assert (m.fc is not None) == (mixer != "attn")
    if mixer == "conv":
        assert not any(isinstance(m, ACmixBase) for m in model.modules())
    out = _forward(model, name)
    assert out.shape[0] == 2 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(UNAVAILABLE))
def test_names_a_family_lacks_are_refused_with_its_choices(name: str) -> None:
    for mixer in UNAVAILABLE[name]:
        with pytest.raises(ValueError, match=rf"mixer={mixer!r} is not available") as err:
            _build(name, mixer=mixer)
        offered = [m for m in MIXERS if m not in UNAVAILABLE[name]]
        assert all(repr(m) in str(err.value) for m in offered)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_unknown_mixer_is_rejected_naming_it_and_the_valid_ones(name: str) -> None:
    with pytest.raises(ValueError, match="mixer must be one of") as err:
        _build(name, mixer="sasa")
    msg = str(err.value)
    assert "'sasa'" in msg and "callable" in msg
    assert all(repr(m) in msg for m in MIXERS if m not in UNAVAILABLE.get(name, ()))
    with pytest.raises(TypeError, match="mixer must be a name"):
        _build(name, mixer=3)


class _Recorder:
    """A mixer factory that records its calls and builds a module of the family's contract."""

    def __init__(self, build: functools.partial[nn.Module]) -> None:
        self.build = build
        self.calls: list[tuple[int, int, int]] = []

    def __call__(self, in_chs: int, out_chs: int, stride: int = 1) -> nn.Module:
        self.calls.append((in_chs, out_chs, stride))
        return self.build(in_chs, out_chs, stride=stride)


class _TokenLinear(nn.Linear):
    """PVT's contract: ``forward(x, H, W)`` on ``(B, P + H*W, C)`` tokens."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        assert stride == 1
        super().__init__(in_chs, out_chs)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        return super().forward(x)


class _ChannelsLastLinear(nn.Linear):
    """Swin's contract: ``forward(x, mask)`` on ``(B, H, W, C)``."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        assert stride == 1
        super().__init__(in_chs, out_chs)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


#: A callable per family: a class or a functools.partial of the family's contract.
CALLABLES: dict[str, functools.partial[nn.Module]] = {
    "acmix_resnet26": functools.partial(ACmix, kernel_att=3, head=2, padding_mode="auto"),
    "acmix_tiny": functools.partial(nn.Conv2d, kernel_size=3, padding=1, bias=False),
    "acmix_san10": functools.partial(nn.Conv2d, kernel_size=1),
    "acmix_pvt_tiny": functools.partial(_TokenLinear),
    SWIN: functools.partial(_ChannelsLastLinear),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_takes_a_callable_with_one_call_signature(name: str) -> None:
    factory = _Recorder(CALLABLES[name])
    model = _build(name, mixer=factory)
    mixers = _mixers(model, name)
    assert len(factory.calls) == len(mixers)
    target = CALLABLES[name].func
    assert all(type(m) is target for m in mixers)
    for (in_chs, out_chs, stride), m in zip(factory.calls, mixers, strict=True):
        assert isinstance(in_chs, int) and isinstance(out_chs, int) and stride in (1, 2)
        if isinstance(m, nn.Conv2d | ACmix):
            assert getattr(m, "in_channels", getattr(m, "in_planes", None)) == in_chs
    if name in ("acmix_resnet26", "acmix_tiny"):  # strided blocks get their stride
        assert {s for _, _, s in factory.calls} == {1, 2}
    out = _forward(model, name)
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_a_callable_must_return_a_module() -> None:
    with pytest.raises(TypeError, match="must return an nn.Module"):
        create_mixer(lambda i, o, stride: "not a module", 8, 8)


# -- one name per concept in the families' signatures ------------------------------------

FAMILY_CLASSES = (ResNet, TinyNet, SAN, PyramidVisionTransformer, SwinTransformer)
OLD_NAMES = {"head", "heads", "in_chs", "attn_backend", "mixer_kwargs", "kernel_conv", "shift_mode"}


@pytest.mark.parametrize("cls", FAMILY_CLASSES, ids=lambda c: c.__name__)
def test_family_signatures_use_one_vocabulary(cls: type[nn.Module]) -> None:
    params = set(inspect.signature(cls.__init__).parameters)
    assert {"mixer", "conv_path", "backend", "in_chans"} <= params
    assert not params & OLD_NAMES
    if cls is not SAN:  # SAN has no heads (its SAM shares weight maps instead)
        assert "num_heads" in params


@pytest.mark.parametrize("old", ["head", "mixer_kwargs", "kernel_conv"])
def test_old_keyword_names_are_gone(old: str) -> None:
    value = {"head": 2, "mixer_kwargs": {}, "kernel_conv": 5}[old]
    with pytest.raises(TypeError, match=old):
        _build("acmix_resnet26", **{old: value})


# -- ConvPathConfig ----------------------------------------------------------------------


def test_conv_path_config_from_dict_none_and_itself() -> None:
    cfg = ConvPathConfig.from_value({"kernel_conv": 5, "shift_mode": "fixed"})
    assert cfg == ConvPathConfig(kernel_conv=5, shift_mode="fixed")
    assert ConvPathConfig.from_value(None) == ConvPathConfig()
    assert ConvPathConfig.from_value(cfg) is cfg
    assert ConvPathConfig.from_value(cfg.to_dict()) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.kernel_conv = 3  # type: ignore[misc]


def test_conv_path_config_bad_key_names_it_and_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"no option 'kernel'; valid options: \('kernel_conv', "):
        ConvPathConfig.from_value({"kernel": 5})
    with pytest.raises(ValueError, match="no option 'kernel'"):
        _build("acmix_resnet26", conv_path={"kernel": 5})
    with pytest.raises(ValueError, match="conv_path.kernel_conv must be odd"):
        ConvPathConfig(kernel_conv=4)
    with pytest.raises(ValueError, match="conv_path.shift_mode must be one of"):
        ConvPathConfig.from_value({"shift_mode": "rolled"})
    with pytest.raises(TypeError, match="conv_path must be a ConvPathConfig"):
        ConvPathConfig.from_value(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_conv_path_dict_and_config_build_the_same_model(name: str) -> None:
    torch.manual_seed(0)
    a = _build(name, conv_path={"kernel_conv": 5, "shift_mode": "fixed"})
    torch.manual_seed(0)
    b = _build(name, conv_path=ConvPathConfig(kernel_conv=5, shift_mode="fixed"))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert all(m.shift_mode == "fixed" for m in a.modules() if isinstance(m, ACmixBase))


# -- create_mixer ------------------------------------------------------------------------


def test_create_mixer_names() -> None:
    x = torch.randn(1, 8, 9, 9)
    conv = create_mixer("conv", 8, 16, 2, conv_path={"kernel_conv": 5})
    assert type(conv) is nn.Conv2d and conv.kernel_size == (5, 5) and conv.bias is None
    for name, paths in MIXER_PATHS.items():
        m = create_mixer(name, 8, 16, 2, num_heads=2, padding_mode="auto")
        assert isinstance(m, ACmix) and m.paths == paths and m.head == 2
        assert m(x).shape == (1, 16, 5, 5)
    assert conv(x).shape == (1, 16, 5, 5)


def test_resolve_mixer() -> None:
    assert resolve_mixer("acmix", "X") == "acmix"
    assert resolve_mixer(nn.Conv2d, "X") is nn.Conv2d
    with pytest.raises(ValueError, match=r"not available for X \(because\)"):
        resolve_mixer("conv", "X", ("acmix",), "because")
