"""The ``"sdpa"`` backend: window attention through ``F.scaled_dot_product_attention``.

PyTorch picks its fused kernel (flash / memory-efficient / math) for the
device and dtype; the additive bias carries Swin's relative position bias and
the shifted-window mask.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["unavailable", "window_attention_sdpa"]


def unavailable(op: str, tensors: Sequence[torch.Tensor], facts: dict[str, Any]) -> str | None:
    """SDPA is part of PyTorch: available for every op this backend implements."""
    return None


def window_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Window attention by SDPA. Layouts as :func:`acmix.ops.window_attention`."""
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=None if bias is None else bias.to(q.dtype),
        dropout_p=dropout_p,
        scale=scale,
    )
