"""Token mixers: one vocabulary for every backbone family, one typed conv-path config.

"ACmix in a backbone" is a config value, not a fork: every family (ResNet,
SAN, PVT, Swin, tiny) builds the token mixer of its blocks from a ``mixer``
argument, and the same value means the same kind of layer in each of them.

Names (:data:`MIXERS`):

==============  ==========================================================
``"acmix"``     ACmix: the family's attention and ACmix's convolution path
                on the same stage-I projections, ``rate1 * att + rate2 *
                conv`` (an :class:`~acmix.layers.ACmixBase` with
                ``paths="both"``). The default everywhere.
``"attn"``      the attention path alone: the family's own attention without
                ACmix's additions (SASA-style local attention in ResNet /
                tiny, patchwise SAM in SAN, SRA in PVT, window attention in
                Swin; ``paths="attn"``). The paper's baselines.
``"acmix_conv"``  ACmix's convolution path alone: the 1x1 projections, ``fc``
                and the shift-aggregation (``paths="conv"``), the paper's
                ablation.
``"conv"``      the plain ``k x k`` convolution baseline, ``k =
                conv_path.kernel_conv``: one dense ``nn.Conv2d`` (``"same"``
                padding) where the mixer sits. No bias where a norm follows
                it (ResNet, tiny, SAN), a bias where the mixer output goes
                straight into the residual sum (Swin, like attention's
                ``proj``).
==============  ==========================================================

Not every family has every name: PVT's classifier reads its class token,
which is not on the image grid, so a convolution-only mixer (``"conv"``,
``"acmix_conv"``) would never let it see the image; PVT rejects them with an
error naming its valid choices.

A **callable** (a class or a :func:`functools.partial`) builds any other
mixer. Every family calls it the same way, ``mixer(in_chs, out_chs,
stride=stride)``; bind everything else with ``functools.partial``, e.g.
``partial(ACmix, kernel_att=5, head=2)`` or ``partial(nn.Conv2d,
kernel_size=5, padding=2, bias=False)``. The module it returns must follow
the family's mixer contract: NCHW ``(B, in_chs, H, W) -> (B, out_chs,
ceil(H / stride), ceil(W / stride))`` in ResNet, tiny and SAN (SAN: ``out_chs``
is the block's ``mid`` width); tokens ``forward(x, H, W)`` ``(B, P + H*W,
C) -> same`` in PVT; channels-last ``forward(x, mask)`` ``(B, H, W, C) ->
same`` in Swin (``mask`` the shifted-window mask or ``None``). In PVT and
Swin ``in_chs == out_chs`` (the block width) and ``stride == 1``.

Convolution options travel as one :class:`ConvPathConfig` (``conv_path=``),
or a dict of its fields (YAML recipes, ``--model-arg``).

The layers themselves keep their own names: :class:`~acmix.layers.ACmix`
keeps the authors' signature ``(in_planes, out_planes, kernel_att, head,
kernel_conv, stride, dilation)`` and :class:`~acmix.layers.WindowACmix`
Swin's ``(dim, window_size, num_heads, ...)``, so the authors' code and
checkpoints map 1:1; the models and this factory use one vocabulary
(``in_chs`` / ``out_chs`` for block widths, ``in_chans`` for the image,
``num_heads``, ``backend``, ``conv_path``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias, cast

from torch import nn

from acmix.layers.acmix import ACmix
from acmix.ops import SHIFT_MODES
from acmix.utils.checks import check_choice, check_odd_kernel

MixerName: TypeAlias = Literal["acmix", "conv", "attn", "acmix_conv"]
ShiftMode: TypeAlias = Literal["learnable", "fixed", "tensor"]

#: A mixer factory: ``factory(in_chs, out_chs, stride=stride) -> nn.Module``.
MixerFactory: TypeAlias = Callable[..., nn.Module]
#: What a ``mixer=`` argument accepts: a name of :data:`MIXERS` or a factory.
MixerSpec: TypeAlias = str | MixerFactory

#: The mixer vocabulary, one meaning per name in every family (module docstring).
MIXERS: tuple[str, ...] = ("acmix", "conv", "attn", "acmix_conv")

#: Names that are ACmix layers -> their ``paths`` (``ACmixBase(paths=...)``).
MIXER_PATHS: dict[str, str] = {"acmix": "both", "attn": "attn", "acmix_conv": "conv"}

__all__ = [
    "MIXERS",
    "MIXER_PATHS",
    "ConvPathConfig",
    "ConvPathLike",
    "MixerFactory",
    "MixerName",
    "MixerSpec",
    "ShiftMode",
    "call_mixer",
    "create_mixer",
    "mixer_label",
    "plain_conv",
    "resolve_mixer",
]


@dataclass(frozen=True)
class ConvPathConfig:
    """Options of a token mixer's convolution, one typed value for every family.

    Attributes:
        kernel_conv: odd kernel ``k`` of the convolution: ACmix's convolution
            path for ``"acmix"`` / ``"acmix_conv"``, the plain ``k x k``
            convolution for ``"conv"`` (the paper: 3).
        shift_mode: ACmix's shift-aggregation form: ``"learnable"`` (grouped
            conv initialised at the shift, the authors' default), ``"fixed"``
            (frozen one-hot kernels) or ``"tensor"`` (explicit shifts, no
            kernels); see :class:`~acmix.layers.ACmixBase`. Unused by ``"conv"``.

    Example:
        >>> ConvPathConfig.from_value({"kernel_conv": 5})
        ConvPathConfig(kernel_conv=5, shift_mode='learnable')
    """

    kernel_conv: int = 3
    shift_mode: ShiftMode = "learnable"

    def __post_init__(self) -> None:
        check_odd_kernel("conv_path.kernel_conv", self.kernel_conv)
        check_choice("conv_path.shift_mode", self.shift_mode, SHIFT_MODES)

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        """The option names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_value(cls, value: ConvPathConfig | Mapping[str, Any] | None) -> ConvPathConfig:
        """A config from a config, a dict of its fields (YAML, ``--model-arg``) or ``None``.

        Args:
            value: a :class:`ConvPathConfig`, a mapping of some of its fields,
                or ``None`` (the defaults).

        Returns:
            The config.

        Raises:
            ValueError: a key of the mapping is not an option (the message
                names it and the valid ones), or a value is invalid.
            TypeError: ``value`` is neither.
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            valid = cls.fields()
            unknown = [k for k in value if k not in valid]
            if unknown:
                raise ValueError(f"conv_path has no option {unknown[0]!r}; valid options: {valid}")
            return cls(**dict(value))
        raise TypeError(
            f"conv_path must be a ConvPathConfig, a dict with keys from {cls.fields()} or "
            f"None, got {type(value).__name__}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict (for YAML / JSON)."""
        return dataclasses.asdict(self)


#: What a ``conv_path=`` argument accepts.
ConvPathLike: TypeAlias = ConvPathConfig | Mapping[str, Any] | None


def resolve_mixer(
    mixer: object,
    family: str,
    choices: Sequence[str] = MIXERS,
    why: str = "",
) -> MixerSpec:
    """Check a ``mixer=`` value for a family: a known name it offers, or a callable.

    Args:
        mixer: the value given.
        family: the family's name, for the message (``"ResNet"``, ``"PVT"``, ...).
        choices: the names of :data:`MIXERS` the family offers.
        why: why a name of :data:`MIXERS` is missing from ``choices`` (for the message).

    Returns:
        The name, or the callable as given.

    Raises:
        ValueError: an unknown name, or a name the family does not offer
            (the message names it and the valid choices for the family).
        TypeError: neither a string nor a callable.
    """
    if isinstance(mixer, str):
        if mixer in choices:
            return mixer
        hint = "or a callable factory(in_chs, out_chs, stride=...) -> nn.Module"
        if mixer in MIXERS:
            reason = f" ({why})" if why else ""
            raise ValueError(
                f"mixer={mixer!r} is not available for {family}{reason}: mixer must be one of "
                f"{tuple(choices)} for {family}, {hint}"
            )
        raise ValueError(f"mixer must be one of {tuple(choices)} {hint}, got {mixer!r}")
    if callable(mixer):
        return cast(MixerFactory, mixer)
    raise TypeError(
        f"mixer must be a name from {tuple(choices)} or a callable returning an nn.Module, "
        f"got {type(mixer).__name__}"
    )


def mixer_label(mixer: MixerSpec) -> str:
    """A short label of a mixer value for ``repr`` and messages: the name or the callable's."""
    if isinstance(mixer, str):
        return mixer
    func = getattr(mixer, "func", mixer)  # functools.partial -> the wrapped callable
    return getattr(func, "__qualname__", None) or type(func).__name__


def call_mixer(factory: MixerFactory, in_chs: int, out_chs: int, stride: int = 1) -> nn.Module:
    """Build a mixer from a callable with the one call signature of every family.

    Args:
        factory: a class or ``functools.partial``: ``factory(in_chs, out_chs, stride=stride)``.
        in_chs: input channels of the mixer.
        out_chs: output channels of the mixer.
        stride: output stride.

    Returns:
        The module.

    Raises:
        TypeError: the callable did not return an ``nn.Module``.
    """
    module = factory(in_chs, out_chs, stride=stride)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"mixer factory {mixer_label(factory)} must return an nn.Module, "
            f"got {type(module).__name__}"
        )
    return module


def plain_conv(
    in_chs: int, out_chs: int, stride: int = 1, *, kernel_size: int = 3, bias: bool = False
) -> nn.Conv2d:
    """The ``"conv"`` mixer: a dense ``k x k`` convolution, ``"same"`` padding.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: output stride (output ``ceil(H / stride)``).
        kernel_size: odd kernel ``k``.
        bias: add a bias.

    Returns:
        ``nn.Conv2d(in_chs, out_chs, k, stride, padding=k // 2, bias=bias)``.
    """
    k = check_odd_kernel("kernel_conv", kernel_size)
    return nn.Conv2d(in_chs, out_chs, k, stride=stride, padding=k // 2, bias=bias)


def create_mixer(
    mixer: MixerSpec,
    in_chs: int,
    out_chs: int,
    stride: int = 1,
    *,
    num_heads: int = 4,
    kernel_att: int = 7,
    conv_path: ConvPathLike = None,
    **attn_options: Any,
) -> nn.Module:
    """Build the spatial token mixer of a convolutional block (NCHW in, NCHW out).

    What the ResNet and tiny families call where a plain network has its
    ``k x k`` convolution.

    Args:
        mixer: a name of :data:`MIXERS` or a callable (see the module docstring):
            ``"acmix"`` (:class:`~acmix.layers.ACmix`), ``"attn"`` (its
            attention path alone: local self-attention, the SASA-style
            baseline), ``"acmix_conv"`` (its convolution path alone) or
            ``"conv"`` (a plain ``kernel_conv x kernel_conv`` convolution
            without bias, the convolutional baseline).
        in_chs: input channels.
        out_chs: output channels.
        stride: output stride (output ``ceil(H / stride)``).
        num_heads: attention heads (ACmix's ``head``).
        kernel_att: attention window.
        conv_path: :class:`ConvPathConfig` or a dict of its fields.
        **attn_options: further keyword options of :class:`~acmix.layers.ACmix`
            (``padding_mode``, ``backend``, ``attn_weight``, ``init``,
            ``mlp_hidden``); not used by ``"conv"`` or a callable.

    Returns:
        The mixer module.

    Raises:
        ValueError: an unknown mixer name (the message names the valid ones).
    """
    kind = resolve_mixer(mixer, "create_mixer")
    if not isinstance(kind, str):
        return call_mixer(kind, in_chs, out_chs, stride)
    cfg = ConvPathConfig.from_value(conv_path)
    if kind == "conv":
        return plain_conv(in_chs, out_chs, stride, kernel_size=cfg.kernel_conv)
    return ACmix(
        in_chs,
        out_chs,
        kernel_att,
        num_heads,
        cfg.kernel_conv,
        stride,
        shift_mode=cfg.shift_mode,
        paths=MIXER_PATHS[kind],
        **attn_options,
    )
