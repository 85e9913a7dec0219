"""Evaluation: loss, top-1 and top-5 over a (sharded) loader, summed over all processes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from acmix.engine.distributed import DistInfo, all_reduce_sum

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    info: DistInfo | None = None,
    *,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Evaluate ``model`` (put in eval mode, restored afterwards) on ``loader``.

    Each process evaluates its own shard (see :class:`acmix.data.EvalBatchSampler`);
    the sums are reduced, so every process returns the metrics of the whole set.

    Args:
        model: a classifier, ``(B, C, H, W) -> (B, num_classes)``.
        loader: ``(images, labels)`` batches.
        info: the process group (``None``: one process on the model's device).
        amp_dtype: autocast dtype (``None``: full precision).
        channels_last: feed NHWC inputs.

    Returns:
        ``{"loss": mean cross-entropy, "top1": %, "top5": % (top-k with
        k = min(5, classes)), "count": images}``.
    """
    info = info or DistInfo(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    c1 = torch.zeros((), dtype=torch.float64, device=info.device)
    c5 = torch.zeros((), dtype=torch.float64, device=info.device)
    count = 0
    autocast = (
        torch.autocast(info.device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    try:
        for x, y in loader:
            x = x.to(info.device, non_blocking=True)
            y = y.to(info.device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast:
                out = model(x)
            out = out.float()
            loss_sum += F.cross_entropy(out, y, reduction="sum").double()
            k = min(5, out.shape[1])
            top = out.topk(k, dim=1).indices
            hit = top == y[:, None]
            c1 += hit[:, 0].sum()
            c5 += hit.any(dim=1).sum()
            count += y.shape[0]
    finally:
        model.train(was_training)
    total_loss, total1, total5, n = all_reduce_sum(
        [loss_sum.item(), c1.item(), c5.item(), float(count)], info
    )
    n = max(n, 1.0)
    return {
        "loss": total_loss / n,
        "top1": 100.0 * total1 / n,
        "top5": 100.0 * total5 / n,
        "count": int(n),
    }
