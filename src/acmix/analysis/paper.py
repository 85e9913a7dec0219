"""Every registered backbone's parameters and multiply-adds against the paper's table."""

from __future__ import annotations

import timm
import torch
from torch import nn

from acmix.analysis.flops import MacsReport, count_macs, count_params
from acmix.models import MODEL_STATS

__all__ = ["count_model", "paper_table"]


def count_model(name: str, img_size: int) -> tuple[nn.Module, int, MacsReport]:
    """Build the registered model ``name`` and count it at a square ``img_size`` input.

    Args:
        name: a timm model name, e.g. ``"acmix_resnet50"``.
        img_size: the input side (one RGB image).

    Returns:
        The model (in eval mode), its parameter count and its MACs report.
    """
    model = timm.create_model(name).eval()
    report = count_macs(model, torch.randn(1, 3, img_size, img_size))
    return model, count_params(model), report


def paper_table(recount: bool = False) -> str:
    """Markdown: every backbone with recorded stats vs the paper (and the authors' code).

    Args:
        recount: count every model now instead of reading the recorded stats.

    Returns:
        The table, one row per model of :data:`acmix.models.MODEL_STATS`.
    """
    lines = [
        "| model | params (ours) | params (authors' code) | params (paper) | Δ params "
        "| GMACs (ours) | GFLOPs (paper) | Δ MACs | top-1 (paper) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in MODEL_STATS.items():
        params, macs = st.params, st.macs
        if recount:
            _, params, report = count_model(name, st.img_size)
            macs = report.total
        dp = f"{100 * (params / st.paper_params - 1):+.1f}%" if st.paper_params else "—"
        dm = f"{100 * (macs / st.paper_macs - 1):+.1f}%" if st.paper_macs else "—"
        official = f"{st.official_params:,}" if st.official_params else "—"
        paper_p = f"{st.paper_params / 1e6:.1f}M" if st.paper_params else "—"
        paper_m = f"{st.paper_macs / 1e9:.1f}" if st.paper_macs else "—"
        top1 = f"{st.paper_top1:.1f}" if st.paper_top1 else "—"
        lines.append(
            f"| {name} | {params:,} | {official} | {paper_p} | {dp} | {macs / 1e9:.2f} "
            f"| {paper_m} | {dm} | {top1} |"
        )
    return "\n".join(lines)
