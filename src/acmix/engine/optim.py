"""Optimiser (SGD / AdamW, timm's weight-decay groups) and a per-step warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from acmix.engine.config import OptimConfig, SchedConfig

__all__ = ["WarmupCosine", "build_optimizer", "peak_lr"]


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """``cfg.lr``, scaled linearly to ``global_batch`` when ``cfg.lr_base_batch`` is set."""
    if cfg.lr_base_batch is None:
        return cfg.lr
    return cfg.lr * global_batch / cfg.lr_base_batch


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW over ``model``'s trainable parameters.

    With ``cfg.decay_1d=False`` the parameters are split by timm's
    :func:`~timm.optim.param_groups_weight_decay`: 1-D tensors (norms,
    biases, ACmix's α / β) and the model's ``no_weight_decay()`` names get no
    weight decay.
    """
    if cfg.decay_1d:
        params: Any = [p for p in model.parameters() if p.requires_grad]
        wd = cfg.weight_decay
    else:
        skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
        params = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
        wd = 0.0  # set per group
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=wd
        )
    return torch.optim.AdamW(params, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=wd)


class WarmupCosine:
    """Per-step learning rate: linear warm-up, then cosine (or constant) to ``min_lr``.

    ``lr(t) = warmup_lr + (peak - warmup_lr) * t / W`` for ``t < W`` warm-up
    steps, then ``min_lr + (peak - min_lr) * (1 + cos(pi * u)) / 2`` with
    ``u = (t - W) / (T - W)``. The state is the step counter.

    Args:
        optimizer: its groups' ``lr`` is set at every :meth:`step`.
        peak: the peak learning rate.
        total_steps: ``T``.
        cfg: the schedule section (``warmup_epochs`` is converted with ``steps_per_epoch``).
        steps_per_epoch: optimizer steps per epoch.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        peak: float,
        total_steps: int,
        cfg: SchedConfig,
        steps_per_epoch: int,
    ) -> None:
        self.optimizer = optimizer
        self.peak = peak
        self.total = max(1, total_steps)
        self.warmup = min(self.total, round(cfg.warmup_epochs * steps_per_epoch))
        self.warmup_lr = cfg.warmup_lr
        self.min_lr = cfg.min_lr
        self.name = cfg.name
        self.t = 0
        self._apply()

    def lr_at(self, t: int) -> float:
        """The learning rate of step ``t`` (0-based)."""
        if t < self.warmup:
            return self.warmup_lr + (self.peak - self.warmup_lr) * t / self.warmup
        if self.name == "constant":
            return self.peak
        u = (t - self.warmup) / max(1, self.total - self.warmup)
        return self.min_lr + (self.peak - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(u, 1.0)))

    def _apply(self) -> None:
        lr = self.lr_at(self.t)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self) -> None:
        """Advance one optimizer step."""
        self.t += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.lr_at(self.t)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "peak": self.peak, "total": self.total, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["total"] != self.total or state["warmup"] != self.warmup:
            raise ValueError(
                f"the checkpoint's schedule ({state['total']} steps, {state['warmup']} warm-up) "
                f"differs from this run's ({self.total}, {self.warmup}): same epochs, batch "
                "size and data set are needed to resume"
            )
        self.t = int(state["t"])
        self._apply()
