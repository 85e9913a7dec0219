"""Token-mixer factory: "ACmix in a backbone" is a config value, not a fork.

Backbones call :func:`create_mixer` where a plain network has its k x k
convolution, so the same backbone code builds the convolution baseline,
the attention-only baseline and the ACmix model.
"""

from __future__ import annotations

from torch import nn

from acmix.layers.acmix import ACmix
from acmix.utils.checks import check_choice

MIXERS: tuple[str, ...] = ("acmix", "conv", "attn")

__all__ = ["MIXERS", "create_mixer"]


def create_mixer(
    mixer: str,
    in_planes: int,
    out_planes: int,
    stride: int = 1,
    *,
    kernel_conv: int = 3,
    kernel_att: int = 7,
    head: int = 4,
    **kwargs: object,
) -> nn.Module:
    """Build the spatial token mixer of a block (NCHW in, NCHW out).

    Args:
        mixer: ``"acmix"`` (ACmix), ``"conv"`` (a plain ``kernel_conv`` x
            ``kernel_conv`` convolution without bias, the convolutional
            baseline) or ``"attn"`` (local self-attention only: ACmix's
            attention path, the SASA-style baseline).
        in_planes: input channels.
        out_planes: output channels.
        stride: output stride (output ``ceil(H / stride)``).
        kernel_conv: convolution kernel (conv and ACmix's conv path).
        kernel_att: attention window (attn and ACmix).
        head: attention heads (attn and ACmix).
        **kwargs: further keyword options of :class:`~acmix.layers.ACmix`
            (``padding_mode``, ``shift_mode``, ``init``, ``backend``, ...).

    Returns:
        The mixer module.
    """
    check_choice("mixer", mixer, MIXERS)
    if mixer == "conv":
        return nn.Conv2d(
            in_planes, out_planes, kernel_conv, stride=stride, padding=kernel_conv // 2, bias=False
        )
    paths = "both" if mixer == "acmix" else "attn"
    return ACmix(
        in_planes,
        out_planes,
        kernel_att,
        head,
        kernel_conv,
        stride,
        paths=paths,
        **kwargs,  # type: ignore[arg-type]
    )
