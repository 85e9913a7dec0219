"""Parameter and multiply-add (MAC) counting that counts every op we run.

Built on :class:`torch.utils.flop_counter.FlopCounterMode`, which counts
matmuls, convolutions, einsum/bmm, ``scaled_dot_product_attention`` and every
op with a registered formula: the C++ kernels of :mod:`acmix.ops.cpp` register
theirs. It counts zero for elementwise work, which is how the ``"shift"`` and
``"reference"`` backends compute the local attention, the patchwise
aggregation and tensor shift-and-sum; inside
:func:`acmix.ops.count_elementwise` those ops report their multiply-adds as
a no-op marker op with a formula, so the counter sees every op, attributed
to the module that ran it. The convention is multiply-adds, as in the ResNet,
Swin and PVT papers (``FlopCounterMode`` reports 2 FLOPs per MAC).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from acmix.ops import count_elementwise

__all__ = ["EXTRA_FORMULAS", "MacsReport", "count_macs", "count_params"]


def _cpu_flash_fwd(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_bwd(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _extra_formulas() -> dict:
    """FLOP formulas torch does not register itself (CPU's fused attention kernels)."""
    ops = torch.ops.aten
    table = {}
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):
        table[ops._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_fwd
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        table[ops._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_bwd
    return table


#: Formulas added to ``FlopCounterMode`` so that no op that does work counts zero.
EXTRA_FORMULAS = _extra_formulas()


@dataclass
class MacsReport:
    """Result of :func:`count_macs`.

    Attributes:
        total: total multiply-adds of one forward call.
        by_module: MACs per module name (hierarchical: a parent includes its
            children; ``""`` is the whole model).
    """

    total: int
    by_module: dict[str, int] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        """Total in units of 1e9 MACs (the papers' "GFLOPs")."""
        return self.total / 1e9


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(
    model: nn.Module,
    inputs: torch.Tensor | tuple[torch.Tensor, ...] | tuple[int, ...],
) -> MacsReport:
    """Count the multiply-adds of ``model(*inputs)``.

    Args:
        model: any module; put it in eval mode first if it behaves differently.
        inputs: a tensor, a tuple of tensors, or a shape tuple such as
            ``(1, 3, 224, 224)`` (a random float tensor on the model's device).

    Returns:
        A :class:`MacsReport` with the total and per-module MACs.
    """
    if isinstance(inputs, tuple) and all(isinstance(v, int) for v in inputs):
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        inputs = (torch.randn(*inputs, device=device, dtype=dtype),)
    elif isinstance(inputs, torch.Tensor):
        inputs = (inputs,)

    counter = FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)
    with count_elementwise(), counter:
        model(*inputs)
    # FlopCounterMode names modules "<RootClass>.<path>"; "Global" is the total.
    root = type(model).__name__
    by_module: dict[str, int] = defaultdict(int)
    for key, ops in counter.get_flop_counts().items():
        if key == root:
            continue  # same as "Global"
        name = "" if key == "Global" else key.removeprefix(root + ".")
        by_module[name] += sum(ops.values()) // 2
    return MacsReport(total=by_module.get("", 0), by_module=dict(by_module))
