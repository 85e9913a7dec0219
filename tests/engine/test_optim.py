"""Optimiser groups, the warm-up + cosine schedule (hand-computed), and evaluation metrics."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from acmix.engine.config import OptimConfig, SchedConfig
from acmix.engine.evaluate import evaluate
from acmix.engine.optim import WarmupCosine, build_optimizer, peak_lr


def test_peak_lr_scales_linearly_with_the_batch() -> None:
    assert peak_lr(OptimConfig(lr=1e-3, lr_base_batch=1024), 256) == pytest.approx(2.5e-4)
    assert peak_lr(OptimConfig(lr=0.1), 4096) == 0.1


def test_schedule_values() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupCosine(opt, 0.4, 10, SchedConfig(warmup_epochs=2, warmup_lr=0.0, min_lr=0.1), 2)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    # 4 warm-up steps from 0 to 0.4, then cosine over 6 steps from 0.4 to 0.1.
    expected = [0.0, 0.1, 0.2, 0.3] + [
        0.1 + 0.3 * 0.5 * (1 + math.cos(math.pi * u / 6)) for u in range(7)
    ]
    assert lrs == pytest.approx(expected)
    state = sched.state_dict()
    other = WarmupCosine(opt, 0.4, 10, SchedConfig(warmup_epochs=2, warmup_lr=0.0, min_lr=0.1), 2)
    other.load_state_dict(state)
    assert other.t == 11 and opt.param_groups[0]["lr"] == pytest.approx(expected[-1])
    with pytest.raises(ValueError, match="differs from this run"):
        WarmupCosine(opt, 0.4, 12, SchedConfig(), 2).load_state_dict(state)


def test_no_decay_groups_hold_1d_params_and_alpha_beta() -> None:
    model = timm.create_model(
        "acmix_tiny", widths=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_classes=3
    )
    opt = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.05, decay_1d=False), 1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    by_id = {id(p): n for n, p in model.named_parameters()}
    no_decay = {
        by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]
    }
    decay = {
        by_id[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.05 for p in g["params"]
    }
    assert no_decay | decay == set(by_id.values()) and not no_decay & decay
    assert {n for n in by_id.values() if n.endswith(("rate1", "rate2"))} <= no_decay
    assert all(model.get_parameter(n).ndim > 1 for n in decay)
    sgd = build_optimizer(model, OptimConfig(weight_decay=1e-4), 0.1)
    assert len(sgd.param_groups) == 1 and sgd.param_groups[0]["weight_decay"] == 1e-4


def test_evaluate_against_hand_computed_metrics() -> None:
    class Fixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1) + self.w  # the input is the logits

    logits = torch.tensor(
        [
            [5.0, 1, 0, 0, 0, 0, 0],
            [0, 5, 4, 3, 2, 1, 0],
            [0, 1, 2, 3, 4, 5, 6],
            [1, 1, 9, 1, 1, 1, 1],
        ]
    )
    labels = torch.tensor([0, 2, 0, 3])  # top-1 hit, top-5 hit, miss, top-5 hit (ties)
    batches = [(logits[:3].view(3, 7, 1, 1), labels[:3]), (logits[3:].view(1, 7, 1, 1), labels[3:])]
    m = evaluate(Fixed().train(), batches)
    assert m["count"] == 4
    assert m["top1"] == pytest.approx(25.0)
    assert m["top5"] == pytest.approx(75.0)
    assert m["loss"] == pytest.approx(nn.functional.cross_entropy(logits, labels).item())
