"""α / β inspection: how much each ACmix layer relies on attention vs convolution.

The paper observes (Sec. 4.5, Fig. 5) that convolution dominates early stages
and attention late ones. :func:`rates_from_state_dict` reads ``rate1`` (α,
attention) and ``rate2`` (β, convolution) of every ACmix layer from any
checkpoint; :func:`path_contributions` measures the effective contribution of
each path on real inputs, ``mean |α·F_att|`` vs ``mean |β·F_conv|``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from acmix.analysis.plotting import pyplot, save_figure
from acmix.layers import ACmixBase

__all__ = [
    "LayerRates",
    "format_rates",
    "mix_layers",
    "mix_weights",
    "path_contributions",
    "plot_rates",
    "rates_from_state_dict",
]


@dataclass
class LayerRates:
    """α, β of one ACmix layer, optionally with measured path magnitudes."""

    layer: str
    alpha: float
    beta: float
    att_magnitude: float | None = None
    conv_magnitude: float | None = None


def rates_from_state_dict(sd: dict[str, torch.Tensor]) -> list[LayerRates]:
    """α (``rate1``) and β (``rate2``) of every ACmix layer, in checkpoint order."""
    out = []
    for key, value in sd.items():
        if key.endswith("rate1"):
            prefix = key[: -len("rate1")]
            beta = sd.get(prefix + "rate2")
            if beta is None:
                continue
            out.append(LayerRates(prefix.rstrip(".") or "<root>", float(value), float(beta)))
    return out


def mix_layers(model: nn.Module) -> list[tuple[str, ACmixBase]]:
    """The ACmix layers of ``model`` that mix two paths (``rate1`` and ``rate2`` both set).

    Args:
        model: any module.

    Returns:
        ``(qualified name, layer)`` pairs in :meth:`~torch.nn.Module.named_modules` order.
    """
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, ACmixBase)
        and isinstance(getattr(m, "rate1", None), torch.Tensor)
        and isinstance(getattr(m, "rate2", None), torch.Tensor)
    ]


def mix_weights(model: nn.Module) -> list[LayerRates]:
    """α (``rate1``, attention) and β (``rate2``, convolution) of every ACmix layer of ``model``.

    The one reader of a live model's mix weights (the training logs use it
    too, :func:`acmix.engine.metrics.alpha_beta`); a tensor-valued rate is
    reported as its mean.

    Args:
        model: any module.

    Returns:
        One :class:`LayerRates` per layer of :func:`mix_layers`, without magnitudes.
    """
    return [
        LayerRates(
            name, float(m.rate1.detach().float().mean()), float(m.rate2.detach().float().mean())
        )
        for name, m in mix_layers(model)
    ]


@torch.no_grad()
def path_contributions(model: nn.Module, images: torch.Tensor) -> list[LayerRates]:
    """Run ``images`` through ``model`` and measure each ACmix layer's two paths.

    Args:
        model: a model containing :class:`~acmix.layers.ACmixBase` layers.
        images: a batch the model accepts, e.g. ``(B, 3, H, W)``.

    Returns:
        Per ACmix layer with both paths: α, β, ``mean |α·F_att|``, ``mean |β·F_conv|``.
    """
    records: dict[str, LayerRates] = {}
    originals = {}
    for name, m in mix_layers(model):
        originals[name] = m

        def mix(att, conv, m=m, name=name):
            a = (m.rate1 * att).abs().mean().item()
            c = (m.rate2 * conv).abs().mean().item()
            records[name] = LayerRates(name, float(m.rate1), float(m.rate2), a, c)
            return type(m).mix(m, att, conv)

        m.mix = mix  # type: ignore[method-assign]
        m.fuse_stage2 = False  # run the two paths separately so that mix sees them
    was_training = model.training
    try:
        model.eval()
        model(images)
    finally:
        for m in originals.values():
            del m.mix
            del m.fuse_stage2
        model.train(was_training)
    return [records[n] for n in originals if n in records]


def format_rates(rows: list[LayerRates]) -> str:
    """Markdown table of α, β (and measured magnitudes when present) by depth."""
    measured = any(r.att_magnitude is not None for r in rows)
    head = "| depth | layer | α (attention) | β (convolution) | α / (α+β) |"
    sep = "|---|---|---|---|---|"
    if measured:
        head += " mean abs α·F_att | mean abs β·F_conv | attention share |"
        sep += "---|---|---|"
    lines = [head, sep]
    for i, r in enumerate(rows):
        share = abs(r.alpha) / max(abs(r.alpha) + abs(r.beta), 1e-12)
        line = f"| {i} | {r.layer} | {r.alpha:.4f} | {r.beta:.4f} | {share:.3f} |"
        if measured and r.att_magnitude is not None and r.conv_magnitude is not None:
            tot = max(r.att_magnitude + r.conv_magnitude, 1e-12)
            line += (
                f" {r.att_magnitude:.4g} | {r.conv_magnitude:.4g} | {r.att_magnitude / tot:.3f} |"
            )
        lines.append(line)
    return "\n".join(lines)


def plot_rates(rows: list[LayerRates], path: str | Path, title: str = "") -> Path:
    """PNG of α and β (and measured path magnitudes) against layer depth."""
    plt = pyplot()

    depth = list(range(len(rows)))
    measured = any(r.att_magnitude is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(11 if measured else 6, 4))
    axes = list(axes) if measured else [axes]
    axes[0].plot(depth, [r.alpha for r in rows], marker="o", label="α (attention)")
    axes[0].plot(depth, [r.beta for r in rows], marker="s", label="β (convolution)")
    axes[0].set_xlabel("ACmix layer (depth)")
    axes[0].set_ylabel("learned scale")
    values = [v for r in rows for v in (r.alpha, r.beta)]
    lo, hi = min(values), max(values)
    axes[0].set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.35 * (hi - lo + 1e-9))  # legend room
    axes[0].legend(loc="upper center", ncol=2, fontsize=8)
    axes[0].grid(alpha=0.3)
    if measured:
        share = [
            (r.att_magnitude or 0.0)
            / max((r.att_magnitude or 0.0) + (r.conv_magnitude or 0.0), 1e-12)
            for r in rows
        ]
        axes[1].plot(depth, share, marker="o", color="C2")
        axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
        axes[1].set_ylim(0, 1)
        axes[1].set_xlabel("ACmix layer (depth)")
        axes[1].set_ylabel("attention share of |output|")
        axes[1].grid(alpha=0.3)
    names = [r.layer for r in rows]
    for ax in axes:  # one integer tick per layer, named by its module
        ax.set_xticks(depth, names, rotation=60, ha="right", fontsize=6 if len(rows) > 12 else 7)
    fig.suptitle(title or "ACmix α / β by depth")
    fig.tight_layout()
    return save_figure(fig, path)
