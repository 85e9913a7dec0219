"""The paper's cost analysis (Sec. 3.3, Table 1): stage I vs stage II, analytic and counted.

Stage I is the 1x1 projections (cost grows with C^2); stage II is the cheap
aggregation (shift-and-sum or windowed softmax, cost grows with C). For every
row the analytic formula of DESIGN.md section 1 is printed next to the number
the MAC counter gets from running the actual module, per image, with
``C_in = C_out = C`` at ``H x W``, ``d = C / N``:

* conv k x k: stage I ``k^2 C^2`` params, ``k^2 C^2 HW`` MACs; stage II no
  params, ``k^2 C HW`` adds.
* local self-attention: stage I ``3 C^2`` / ``3 C^2 HW``; stage II the
  positional encoding (``3d`` params) and ``2 k_a^2 C HW``.
* ACmix with tensor shifts or fixed kernels: stage I shared with attention;
  stage II attention + FC (``3N k_c^2`` params, ``3 k_c^2 C HW``) + shifts
  (``k_c^2 C HW``; the fixed-kernel group conv *runs* ``k_c^4 C HW``, which
  is what the counter sees).
* ACmix with the learnable group conv (the authors' default): as above plus
  ``k_c^4 C`` params and ``k_c^4 C HW`` MACs for the group conv.

(biases are counted in the params of the counted rows; the analytic rows
follow the paper and omit them; the positional encoding adds ``2d HW``.)
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from acmix.analysis.flops import count_macs, count_params
from acmix.analysis.plotting import pyplot, save_figure
from acmix.analysis.timing import time_fn
from acmix.layers import ACmix
from acmix.ops import conv2d_as_shift_sum

__all__ = [
    "PAPER_CHANNELS",
    "PAPER_SIZES",
    "CostRow",
    "ShiftSumConv",
    "compare_with_conv",
    "cost_table",
    "format_cost_csv",
    "format_cost_markdown",
    "plot_cost",
]

PAPER_CHANNELS: tuple[int, ...] = (64, 128, 256, 512)
PAPER_SIZES: tuple[int, ...] = (56, 28, 14, 7)


class ShiftSumConv(nn.Module):
    """A k x k convolution computed as the paper's Eq. 1-3: one 1x1 conv to k^2 C maps + shift-sum.

    Used to count the convolution's two stages separately.
    """

    def __init__(self, channels: int, kernel: int) -> None:
        super().__init__()
        self.kernel = kernel
        self.proj = nn.Conv2d(channels, kernel * kernel * channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, C, H, W)``."""
        k, C = self.kernel, x.shape[1]
        # proj's weight, channel p * C + o, is the k x k kernel read position-major.
        weight = self.proj.weight.view(k, k, C, C).permute(2, 3, 0, 1)
        return conv2d_as_shift_sum(x, weight)


@dataclass
class CostRow:
    """One row of the cost table (per image)."""

    module: str
    channels: int
    size: int
    stage1_params: int
    stage1_macs: int
    stage2_params: int
    stage2_macs: int
    counted_stage1_macs: int
    counted_stage2_macs: int
    counted_params: int
    stage1_ms: float | None = None
    stage2_ms: float | None = None

    @property
    def total_macs(self) -> int:
        return self.stage1_macs + self.stage2_macs


def _analytic(name: str, C: int, H: int, N: int, ka: int, kc: int, k: int) -> tuple[int, ...]:
    HW = H * H
    d = C // N
    s1p, s1m = 3 * C * C, 3 * C * C * HW
    if name == "conv":
        return k * k * C * C, k * k * C * C * HW, 0, k * k * C * HW
    attn = 2 * ka * ka * C * HW + 2 * d * HW  # + positional encoding (2 -> d 1x1 conv)
    pe_p = 3 * d
    if name == "attention":
        return s1p, s1m, pe_p, attn
    fc_p, fc_m = 3 * N * kc * kc, 3 * N * kc * kc * d * HW
    if name in ("acmix-tensor", "acmix-fixed"):
        return s1p, s1m, pe_p + fc_p, attn + fc_m + kc * kc * C * HW
    # learnable group conv (the authors' default)
    return s1p, s1m, pe_p + fc_p + kc**4 * C, attn + fc_m + kc**4 * C * HW


def _modules(name: str, C: int, N: int, ka: int, kc: int, k: int) -> tuple[nn.Module, nn.Module]:
    """(stage-I module, whole module) for a row."""
    if name == "conv":
        full = ShiftSumConv(C, k)
        return full.proj, full
    stage1 = nn.Conv2d(C, 3 * C, 1)
    if name == "attention":
        return stage1, ACmix(C, C, ka, N, kc, paths="attn", padding_mode="auto")
    mode = {"acmix-tensor": "tensor", "acmix-fixed": "fixed", "acmix": "learnable"}[name]
    return stage1, ACmix(C, C, ka, N, kc, shift_mode=mode, padding_mode="auto")


ROW_NAMES: dict[str, str] = {
    "conv": "conv k×k",
    "attention": "local self-attention",
    "acmix-tensor": "ACmix (tensor shift)",
    "acmix-fixed": "ACmix (fixed-kernel group conv)",
    "acmix": "ACmix (learnable group conv)",
}


def _time_ms(module: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return 1e3 * time_fn(lambda: module(x), x.device, min_time=0.2)


def cost_table(
    channels: tuple[int, ...] = PAPER_CHANNELS,
    sizes: tuple[int, ...] = PAPER_SIZES,
    *,
    num_heads: int = 4,
    kernel_att: int = 7,
    kernel_conv: int = 3,
    kernel: int = 3,
    measure_time: bool = False,
) -> list[CostRow]:
    """Table 1 for every ``C`` in ``channels`` and ``H`` in ``sizes``.

    Args:
        channels: widths ``C`` (``C_in = C_out``).
        sizes: square map sizes ``H``.
        num_heads: attention heads ``N``.
        kernel_att: attention window ``k_a``.
        kernel_conv: ACmix conv-path kernel ``k_c``.
        kernel: the plain convolution's kernel ``k``.
        measure_time: also time stage I and the whole module (batch 1, this
            machine, forward) so the gap between MACs and time is visible.

    Returns:
        One :class:`CostRow` per (module, C, H).
    """
    rows: list[CostRow] = []
    for C in channels:
        for H in sizes:
            for name in ROW_NAMES:
                s1p, s1m, s2p, s2m = _analytic(
                    name, C, H, num_heads, kernel_att, kernel_conv, kernel
                )
                stage1, full = _modules(name, C, num_heads, kernel_att, kernel_conv, kernel)
                full.eval()
                x = torch.randn(1, C, H, H)
                counted_total = count_macs(full, x).total
                counted_s1 = count_macs(stage1, x).total
                t1 = t2 = None
                if measure_time:
                    t1 = _time_ms(stage1, x)
                    t2 = max(_time_ms(full, x) - t1, 0.0)
                rows.append(
                    CostRow(
                        ROW_NAMES[name],
                        C,
                        H,
                        s1p,
                        s1m,
                        s2p,
                        s2m,
                        counted_s1,
                        counted_total - counted_s1,
                        count_params(full),
                        t1,
                        t2,
                    )
                )
    return rows


def _m(v: int) -> str:
    return f"{v / 1e6:.2f}"


def format_cost_markdown(rows: list[CostRow]) -> str:
    """Markdown table: params (k) and MMACs, analytic and counted, per stage."""
    timed = any(r.stage1_ms is not None for r in rows)
    head = (
        "| C | H×W | module | stage I params | stage II params | counted params "
        "| stage I MMACs | counted | stage II MMACs | counted | II / I |"
    )
    sep = "|---|---|---|---|---|---|---|---|---|---|---|"
    if timed:
        head += " stage I ms | stage II ms |"
        sep += "---|---|"
    lines = [head, sep]
    for r in rows:
        line = (
            f"| {r.channels} | {r.size}² | {r.module} | {r.stage1_params:,} | {r.stage2_params:,} "
            f"| {r.counted_params:,} | {_m(r.stage1_macs)} | {_m(r.counted_stage1_macs)} "
            f"| {_m(r.stage2_macs)} | {_m(r.counted_stage2_macs)} "
            f"| {r.stage2_macs / max(r.stage1_macs, 1):.2f} |"
        )
        if timed:
            line += f" {r.stage1_ms:.2f} | {r.stage2_ms:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def format_cost_csv(rows: list[CostRow]) -> str:
    """The same table as CSV (one column per field)."""
    buf = io.StringIO()
    fields = list(asdict(rows[0]).keys()) if rows else []
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for r in rows:
        writer.writerow(asdict(r))
    return buf.getvalue()


def plot_cost(rows: list[CostRow], path: str | Path) -> Path:
    """PNG: stage I vs stage II MACs against C, one panel per map size, log scale."""
    plt = pyplot()

    sizes = sorted({r.size for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 4), squeeze=False)
    modules = list(dict.fromkeys(r.module for r in rows))
    # Curves can coincide (tensor shift and a fixed kernel cost the same): each module gets
    # its own marker, drawn smaller than the one before, so a curve under another shows.
    markers = ["o", "^", "v", "D", "x", "P", "*"]
    style = {m: (markers[i % len(markers)], 9 - 1.2 * i) for i, m in enumerate(modules)}
    for ax, H in zip(axes[0], sizes, strict=True):
        sel = [r for r in rows if r.size == H]
        chans = sorted({r.channels for r in sel})
        for mod in modules:
            pts = {r.channels: r for r in sel if r.module == mod}
            if mod in (modules[0], modules[-1]):
                label = mod if mod == modules[0] else "attention & ACmix (3C², shared)"
                ax.plot(
                    chans,
                    [pts[c].stage1_macs for c in chans],
                    "--",
                    marker="s",
                    label=f"stage I: {label}",
                )
            marker, size = style[mod]
            ax.plot(
                chans,
                [pts[c].stage2_macs for c in chans],
                marker=marker,
                markersize=max(size, 3),
                markerfacecolor="none",
                label=f"stage II: {mod}",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(chans, [str(c) for c in chans])
        ax.set_title(f"{H}×{H}")
        ax.set_xlabel("channels C")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("multiply-adds per image")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.suptitle("Stage I (1×1 projections, ∝ C²) vs stage II (aggregation, ∝ C)")
    fig.tight_layout(rect=(0, 0.14, 1, 1))  # room below the panels: the legend covers no data
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7)
    return save_figure(fig, path)


def compare_with_conv(
    in_planes: int,
    out_planes: int,
    kernel: int = 3,
    size: int = 56,
    *,
    num_heads: int = 4,
    kernel_att: int = 7,
    stride: int = 1,
) -> str:
    """Answer "ACmix(in -> out) vs the k x k conv it replaces": params, MACs, time, per image."""
    conv = nn.Conv2d(in_planes, out_planes, kernel, stride=stride, padding=kernel // 2)
    layer = ACmix(in_planes, out_planes, kernel_att, num_heads, kernel, stride, padding_mode="auto")
    x = torch.randn(1, in_planes, size, size)
    rows = []
    for name, m in ((f"Conv2d {kernel}×{kernel}", conv), ("ACmix", layer.eval())):
        macs = count_macs(m, x).total
        rows.append((name, count_params(m), macs, _time_ms(m, x)))
    base = rows[0]
    lines = [
        f"in={in_planes} out={out_planes} kernel={kernel} stride={stride} num_heads={num_heads} "
        f"kernel_att={kernel_att} at {size}×{size}, per image:",
        "| layer | params | ×conv | MMACs | ×conv | fwd ms (this machine) |",
        "|---|---|---|---|---|---|",
    ]
    for name, p, macs, t in rows:
        lines.append(
            f"| {name} | {p:,} | {p / base[1]:.2f} | {macs / 1e6:.2f} | {macs / base[2]:.2f} "
            f"| {t:.2f} |"
        )
    return "\n".join(lines)
