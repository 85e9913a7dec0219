"""Put ACmix into any network: replace its k x k convolutions, say what was replaced.

:func:`convert_model` walks a model, picks the ``nn.Conv2d`` layers with a
spatial kernel (or those ``filter`` selects), and swaps each for
:meth:`ACmixConv2d.from_conv2d` of it. A convolution ACmix cannot reproduce
(an even or non-square kernel, padding other than ``kernel // 2``, dilation,
groups, a non-zero padding mode) is never replaced by something with another
output: the call refuses it with the reason, or with
``skip_unsupported=True`` leaves it as it is and reports why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from acmix.layers.acmix import ACmixBase, ACmixConv2d

__all__ = ["ConvReplacement", "convert_model"]


@dataclass(frozen=True)
class ConvReplacement:
    """One convolution :func:`convert_model` looked at.

    Attributes:
        name: its qualified name in the model (``"layer1.0.conv2"``).
        conv: the convolution, as ``repr`` shows it.
        replaced: whether it was replaced.
        reason: why not (``None`` when replaced).
    """

    name: str
    conv: str
    replaced: bool
    reason: str | None = None


def _spatial(name: str, conv: nn.Conv2d) -> bool:
    return conv.kernel_size != (1, 1)


def convert_model(
    model: nn.Module,
    filter: Callable[[str, nn.Conv2d], bool] | None = None,
    *,
    skip_unsupported: bool = False,
    **acmix_kwargs: object,
) -> list[ConvReplacement]:
    """Replace the matching ``nn.Conv2d`` layers of ``model`` by ACmix, in place.

    Every candidate is checked before anything changes, so a refused call
    leaves the model untouched. A convolution reachable under several names
    (a shared module) is replaced by one ACmix layer everywhere.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18()
        >>> done = convert_model(net, lambda name, conv: name.startswith("layer1"))
        >>> [r.name for r in done if r.replaced]
        ['layer1.0.conv1', 'layer1.0.conv2', 'layer1.1.conv1', 'layer1.1.conv2']

    Args:
        model: any module (modified in place).
        filter: ``filter(name, conv) -> bool`` picks the convolutions to replace;
            default: every one with a kernel other than 1 x 1.
        skip_unsupported: leave a convolution ACmix cannot reproduce as it is
            (reported with the reason) instead of refusing the whole call.
        **acmix_kwargs: options of :class:`ACmixConv2d` (``num_heads``, ``kernel_att``,
            ``padding_mode``, ``backend``, ...), the same for every replacement.

    Returns:
        One :class:`ConvReplacement` per selected convolution, in module order.

    Raises:
        ValueError: a selected convolution cannot be reproduced (every one is
            named, with its reason) and ``skip_unsupported`` is false; or nothing
            was selected.
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    pick = filter or _spatial
    names: dict[int, list[str]] = {}
    convs: dict[int, nn.Conv2d] = {}
    inside: list[str] = []  # ACmix layers already there: their own convolutions stay
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, ACmixBase):
            inside.append(name + ".")
            continue
        if any(name.startswith(p) for p in inside):
            continue
        if name and isinstance(module, nn.Conv2d) and pick(name, module):
            names.setdefault(id(module), []).append(name)
            convs[id(module)] = module
    if not convs:
        raise ValueError("no convolution to replace: the filter selected no nn.Conv2d")
    report: list[ConvReplacement] = []
    new: dict[int, nn.Module] = {}
    for key, conv in convs.items():
        try:
            new[key] = ACmixConv2d.from_conv2d(conv, **acmix_kwargs)
        except ValueError as e:  # a TypeError (an unknown option) is the caller's
            report += [ConvReplacement(n, repr(conv), False, str(e)) for n in names[key]]
        else:
            report += [ConvReplacement(n, repr(conv), True) for n in names[key]]
    refused = [r for r in report if not r.replaced]
    if refused and not skip_unsupported:
        raise ValueError(
            f"{len(refused)} selected convolution(s) cannot be replaced by ACmix (pass "
            "skip_unsupported=True to keep them, or a filter that leaves them out):\n  "
            + "\n  ".join(f"{r.name}: {r.reason}" for r in refused)
        )
    for key, layer in new.items():
        for name in names[key]:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, layer)
    return report
