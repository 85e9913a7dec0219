"""Optimiser and learning-rate schedule: timm's, configured by the recipe's sections.

* :func:`build_optimizer` is ``timm.optim.create_optimizer_v2``: any optimizer
  of timm's registry (SGD, AdamW, LAMB, Lion, Adan, ...), its weight-decay
  groups and layer-wise learning-rate decay.
* :class:`LRSchedule` is ``timm.scheduler.create_scheduler_v2`` stepped per
  update (``step_update``), behind a thin wrapper that keeps what the
  trainer guarantees (see its docstring).
* :func:`peak_lr` scales the recipe's learning rate to the global batch.
"""

from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Any

import torch
from timm.optim import create_optimizer_v2, get_optimizer_class, get_optimizer_info
from timm.optim import param_groups_layer_decay as _layer_groups
from timm.scheduler import create_scheduler_v2
from torch import nn

from acmix.engine.config import ConfigError, OptimConfig, SchedConfig

__all__ = ["LRSchedule", "build_optimizer", "peak_lr"]

#: Schedules that decay over the steps after the warm-up (timm's ``warmup_prefix=True``).
_DECAY_AFTER_WARMUP = ("cosine", "tanh", "poly")
#: Keys of timm's scheduler state that follow the learning rate (``optim.lr``,
#: the batch), not the schedule's shape: a resume may change them.
_LR_KEYS = frozenset({"base_values", "warmup_steps", "metric"})


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """``cfg.lr``, scaled to ``global_batch`` when ``cfg.lr_base_batch`` is set.

    Linearly (``lr * batch / base``) or, with ``cfg.lr_base_scale="sqrt"``, by
    the square root of that ratio (what timm's ``train.py`` does for adaptive
    optimizers).
    """
    if cfg.lr_base_batch is None:
        return cfg.lr
    ratio = global_batch / cfg.lr_base_batch
    return cfg.lr * (math.sqrt(ratio) if cfg.lr_base_scale == "sqrt" else ratio)


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """``cfg.name`` from timm's registry over ``model``'s trainable parameters.

    Parameter groups (``timm.optim.create_optimizer_v2``):

    * ``cfg.decay_1d=False``: 1-D tensors (norms, biases, ACmix's alpha / beta)
      and the model's ``no_weight_decay()`` names get no weight decay;
    * ``cfg.decay_1d=True``: every parameter decays (one group; timm's own
      groups would still exempt ``no_weight_decay()``, so they are built here
      with an empty exemption list);
    * ``cfg.layer_decay``: timm's layer-wise groups (by the model's
      ``group_matcher``), each with its ``lr_scale``, which the schedule applies.

    ``momentum`` / ``nesterov`` / ``betas`` / ``eps`` are passed to the
    optimizers that take them, ``cfg.kwargs`` as they are.

    Raises:
        ConfigError: the optimizer needs a package that is not installed, or
            does not take one of ``cfg.kwargs``.
    """
    base = cfg.name.removeprefix("lookahead_")
    info = get_optimizer_info(base)
    try:
        cls = get_optimizer_class(info, bind_defaults=False)
    except ImportError as e:
        raise ConfigError(f"optim.name={cfg.name!r} needs a package that is missing: {e}") from None
    extra: dict[str, Any] = dict(cfg.kwargs)
    if cfg.betas is not None and info.has_betas:
        extra["betas"] = tuple(cfg.betas)
    if cfg.eps is not None and info.has_eps:
        extra["eps"] = cfg.eps
    if "nesterov" in inspect.signature(cls).parameters:
        extra["nesterov"] = cfg.nesterov
    common = dict(opt=cfg.name, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    try:
        if not cfg.decay_1d:
            return create_optimizer_v2(
                model, filter_bias_and_bn=True, layer_decay=cfg.layer_decay, **common, **extra
            )
        if cfg.layer_decay is None:
            params = [p for p in model.parameters() if p.requires_grad]
            return create_optimizer_v2(params, **common, **extra)
        groups = partial(
            _layer_groups,
            weight_decay=cfg.weight_decay,
            layer_decay=cfg.layer_decay,
            no_weight_decay_list=(),
            weight_decay_exclude_1d=False,
        )
        return create_optimizer_v2(model, param_group_fn=groups, **common, **extra)
    except TypeError as e:
        raise ConfigError(f"optim: {cfg.name} does not take these settings ({e})") from None


class LRSchedule:
    """A timm scheduler (``create_scheduler_v2``) stepped after every optimizer update.

    The recipe's epoch quantities (``sched.warmup_epochs``, ``decay_epochs``,
    ``decay_milestones``) are converted to optimizer steps here, rounded
    (``round(epochs * steps_per_epoch)``), and timm is given steps
    (``step_on_epochs=False, updates_per_epoch=1``). This thin wrapper stays
    because timm's API cannot honour three guarantees on its own:

    * **Whole steps.** Given ``updates_per_epoch`` timm multiplies fractional
      epochs into fractional step counts (a 0.5-epoch warm-up over 7 steps
      ends at step 3.5), and epochs converted back and forth need not give
      whole steps again; rounding here keeps the schedule what it was.
    * **The counter.** timm's schedulers are stateless functions of the
      update count passed to ``step_update``; the trainer's resume check
      (step == scheduler step) needs the count kept with the schedule.
    * **Refusing a different schedule on resume.** timm's
      ``load_state_dict`` overwrites the scheduler with the checkpoint's
      settings, so a resume under other epochs / batch / data would silently
      follow the old schedule. :meth:`load_state_dict` compares first and
      raises naming what differs. The learning rate itself (``optim.lr``,
      scaled with the batch) comes from this run, as it always has.

    ``cosine``, ``tanh`` and ``poly`` decay over the steps after the warm-up
    (``lr = peak`` at its end, ``min_lr`` after the last step: timm's
    ``warmup_prefix=True``), the per-step warm-up + cosine the recipes
    always had. ``step`` / ``multistep`` count from the run's first step.

    Args:
        optimizer: its groups' ``lr`` (times their ``lr_scale``) is set after every :meth:`step`.
        cfg: the schedule section.
        total_steps: optimizer steps of the whole run.
        steps_per_epoch: optimizer steps per epoch.

    Raises:
        ConfigError: settings timm refuses (e.g. a ``wsd`` decay longer than the run).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        cfg: SchedConfig,
        total_steps: int,
        steps_per_epoch: int,
    ) -> None:
        self.optimizer = optimizer
        self.name = cfg.name
        self.total = max(1, total_steps)
        self.warmup = min(self.total, round(cfg.warmup_epochs * steps_per_epoch))

        def steps(epochs: float) -> int:
            return max(1, round(epochs * steps_per_epoch))

        prefix = cfg.name in _DECAY_AFTER_WARMUP
        kwargs: dict[str, Any] = dict(
            sched=cfg.name,
            num_epochs=max(1, self.total - self.warmup) if prefix else self.total,
            warmup_epochs=self.warmup,
            warmup_prefix=prefix,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            decay_rate=cfg.decay_rate,
            decay_milestones=[round(m * steps_per_epoch) for m in cfg.decay_milestones],
            step_on_epochs=False,
            updates_per_epoch=1,
        )
        d = cfg.decay_epochs
        if cfg.name == "step":
            kwargs["decay_epochs"] = steps(90.0 if d is None else d)
        elif cfg.name in ("wsd", "rsqrt"):
            kwargs["decay_epochs"] = d if d is None or d < 1 else steps(d)
        try:
            sched, _ = create_scheduler_v2(optimizer, **kwargs)
        except (ValueError, AssertionError) as e:
            raise ConfigError(
                f"sched: timm refuses this schedule over {self.total} steps "
                f"({self.warmup} warm-up): {e}"
            ) from None
        self.sched = sched
        self.t = 0
        self.sched.step_update(0)

    def step(self) -> None:
        """Advance one optimizer update (timm's ``step_update(num_updates)``)."""
        self.t += 1
        self.sched.step_update(self.t)

    def get_last_lr(self) -> float:
        """The learning rate of the next update (the largest group's; layer decay scales others)."""
        return max(float(g["lr"]) for g in self.optimizer.param_groups)

    def lrs(self) -> list[float]:
        """Every parameter group's learning rate for the next update."""
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        """Plain values (``torch.load(weights_only=True)`` reads them): the count, timm's state."""
        return {
            "t": self.t,
            "name": self.name,
            "total": self.total,
            "warmup": self.warmup,
            "timm": self.sched.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the checkpoint's step; refuse a checkpoint of another schedule.

        A state written before the timm schedulers (``t``, ``peak``,
        ``total``, ``warmup``) is accepted when its steps agree.

        Raises:
            ValueError: the checkpoint's schedule differs (the message names what).
        """
        mine = _schedule_shape(self.state_dict())
        if "timm" in state:
            theirs = _schedule_shape(state)
        else:  # the hand-written warm-up + cosine's state
            theirs = {k: state.get(k) for k in ("total", "warmup")}
            mine = {k: mine[k] for k in theirs}
        diffs = [
            f"{k}: {theirs.get(k)!r} vs {mine.get(k)!r}"
            for k in sorted(set(mine) | set(theirs))
            if theirs.get(k) != mine.get(k)
        ]
        if diffs:
            raise ValueError(
                f"the checkpoint's schedule differs from this run's ({'; '.join(diffs)}): the "
                "same train.epochs, data.batch_size, data set and sched settings are needed "
                "to resume"
            )
        if "timm" in state:
            self.sched.load_state_dict(_timm_shape(state["timm"]))
        self.t = int(state["t"])
        self.sched.step_update(self.t)


def _timm_shape(timm_state: dict[str, Any]) -> dict[str, Any]:
    """timm's scheduler state less what follows the learning rate (``_LR_KEYS``)."""
    return {k: v for k, v in timm_state.items() if k not in _LR_KEYS}


def _schedule_shape(state: dict[str, Any]) -> dict[str, Any]:
    """What a resume must match in an :meth:`LRSchedule.state_dict` (with timm's state)."""
    shape = _timm_shape(state["timm"])
    return {
        "name": state.get("name"),
        "total": state.get("total"),
        "warmup": state.get("warmup"),
        **shape,
    }
