"""Optimiser and schedule (timm's, through our sections), and evaluation metrics."""

from __future__ import annotations

import io
import math

import pytest
import timm
import torch
from timm.optim import Lamb, Lion, create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from acmix.engine.config import ConfigError, OptimConfig, SchedConfig, load_config
from acmix.engine.evaluate import evaluate
from acmix.engine.optim import LRSchedule, build_optimizer, peak_lr


def _tiny() -> nn.Module:
    return timm.create_model(
        "acmix_tiny", widths=(8, 16, 16, 32), depths=(1, 1, 1, 1), num_classes=3
    )


def _sgd(lr: float = 0.4) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def _run(sched: object, opt: torch.optim.Optimizer, steps: int, timm_direct: bool) -> list:
    """The group learning rates of each of ``steps`` updates (timm: ``step_update(n)``)."""
    out = []
    for n in range(1, steps + 1):
        out.append([g["lr"] for g in opt.param_groups])
        if timm_direct:
            sched.step_update(n)  # type: ignore[attr-defined]
        else:
            sched.step()  # type: ignore[attr-defined]
    return out


def test_peak_lr_scales_with_the_batch() -> None:
    assert peak_lr(OptimConfig(lr=1e-3, lr_base_batch=1024), 256) == pytest.approx(2.5e-4)
    assert peak_lr(OptimConfig(lr=0.1), 4096) == 0.1
    sqrt = OptimConfig(lr=1e-3, lr_base_batch=1024, lr_base_scale="sqrt")
    assert peak_lr(sqrt, 256) == pytest.approx(5e-4)


def test_schedule_values() -> None:
    """The recipes' per-step warm-up then cosine, against hand-computed values."""
    opt = _sgd()
    cfg = SchedConfig(warmup_epochs=2, warmup_lr=0.0, min_lr=0.1)
    sched = LRSchedule(opt, cfg, 10, 2)
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    # 4 warm-up steps from 0 to 0.4, then cosine over 6 steps from 0.4 to 0.1.
    expected = [0.0, 0.1, 0.2, 0.3] + [
        0.1 + 0.3 * 0.5 * (1 + math.cos(math.pi * u / 6)) for u in range(7)
    ]
    assert lrs == pytest.approx(expected)
    assert sched.t == 11 and sched.get_last_lr() == pytest.approx(0.1)
    # A fractional warm-up is rounded to whole steps: 0.5 epoch of 7 steps = 4 steps.
    half = LRSchedule(_sgd(), SchedConfig(warmup_epochs=0.5, warmup_lr=0.0), 21, 7)
    assert half.warmup == 4
    assert _run(half, half.optimizer, 5, False)[4] == [pytest.approx(0.4)]


@pytest.mark.parametrize(
    ("cfg", "direct"),
    [
        (
            SchedConfig(name="cosine", warmup_epochs=2, warmup_lr=1e-3, min_lr=1e-2),
            dict(sched="cosine", num_epochs=4, warmup_prefix=True, warmup_lr=1e-3, min_lr=1e-2),
        ),
        (
            SchedConfig(name="step", warmup_epochs=1, decay_epochs=2, decay_rate=0.5),
            dict(sched="step", num_epochs=6, decay_epochs=2, decay_rate=0.5, warmup_lr=1e-6),
        ),
        (
            SchedConfig(name="multistep", decay_milestones=(2, 5), decay_rate=0.1),
            dict(sched="multistep", num_epochs=6, decay_milestones=[2, 5], decay_rate=0.1),
        ),
        (
            SchedConfig(name="poly", warmup_epochs=1, decay_rate=2.0),
            dict(sched="poly", num_epochs=5, warmup_prefix=True, decay_rate=2.0, warmup_lr=1e-6),
        ),
    ],
    ids=["cosine", "step", "multistep", "poly"],
)
def test_schedule_is_timms_built_directly(cfg: SchedConfig, direct: dict) -> None:
    """Our section -> the same learning rate at every update as timm's factory per update."""
    spe, epochs = 5, 6
    model_a, model_b = _tiny(), _tiny()
    model_b.load_state_dict(model_a.state_dict())
    timm_groups = OptimConfig(name="adamw", layer_decay=0.7, decay_1d=False)  # timm's default
    opt_a = build_optimizer(model_a, timm_groups, 1e-3)
    opt_b = create_optimizer_v2(model_b, "adamw", lr=1e-3, weight_decay=1e-4, layer_decay=0.7)
    ours = LRSchedule(opt_a, cfg, epochs * spe, spe)
    warmup = {"warmup_epochs": cfg.warmup_epochs} if cfg.warmup_epochs else {}
    theirs, _ = create_scheduler_v2(
        opt_b, **direct, **warmup, step_on_epochs=False, updates_per_epoch=spe
    )
    assert len(opt_a.param_groups) == len(opt_b.param_groups) > 2
    assert _run(ours, opt_a, epochs * spe + 1, False) == _run(theirs, opt_b, epochs * spe + 1, True)


def test_layer_decay_groups() -> None:
    model = _tiny()
    opt = build_optimizer(model, OptimConfig(name="adamw", layer_decay=0.5, decay_1d=False), 1.0)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[-2] == 0.5  # the head: 1.0
    sched = LRSchedule(opt, SchedConfig(name="constant"), 10, 5)
    assert sorted(set(sched.lrs())) == scales and sched.get_last_lr() == 1.0
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 1e-4}
    # decay_1d=True: every parameter decays, layer decay or not (alpha / beta too).
    all_decay = build_optimizer(model, OptimConfig(layer_decay=0.5, weight_decay=0.05), 0.1)
    assert {g["weight_decay"] for g in all_decay.param_groups} == {0.05}
    n = sum(len(g["params"]) for g in all_decay.param_groups)
    assert n == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("name", "cls"), [("lamb", Lamb), ("lion", Lion)])
def test_lamb_and_lion_are_selectable(name: str, cls: type) -> None:
    model = _tiny()
    opt = build_optimizer(model, OptimConfig(name=name, weight_decay=0.01, decay_1d=False), 1e-3)
    assert isinstance(opt, cls)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert load_config(None, [f"optim.name={name}"]).optim.name == name


def test_bad_optimizer_name_is_named_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"optim\.name .*got 'adamx'; known: .*adamw.*lamb"):
        OptimConfig(name="adamx")
    with pytest.raises(ConfigError, match="'adamx'"):
        load_config(None, ["optim.name=adamx"])
    assert OptimConfig(name="lookahead_adamw").name == "lookahead_adamw"
    with pytest.raises(ConfigError, match=r"optim\.betas: adan takes 3 betas, got 2"):
        OptimConfig(name="adan", betas=(0.9, 0.99))
    with pytest.raises(ConfigError, match=r"sched\.name must be one of \['cosine'"):
        SchedConfig(name="plateau")


def test_resume_refuses_another_schedule() -> None:
    cfg = SchedConfig(warmup_epochs=1, warmup_lr=0.0)
    sched = LRSchedule(_sgd(), cfg, 20, 4)
    for _ in range(7):
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)  # what a checkpoint's .state.pt holds
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt = _sgd()
    again = LRSchedule(opt, cfg, 20, 4)
    again.load_state_dict(state)
    assert again.t == 7 and opt.param_groups[0]["lr"] == sched.get_last_lr()
    # Another learning rate is this run's to choose (as before); another shape is refused.
    LRSchedule(_sgd(0.2), cfg, 20, 4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"differs from this run.*t_initial: 16 vs 20"):
        LRSchedule(_sgd(), cfg, 24, 4).load_state_dict(state)
    with pytest.raises(ValueError, match=r"differs from this run.*name: 'cosine' vs 'step'"):
        LRSchedule(_sgd(), SchedConfig(name="step", warmup_epochs=1), 20, 4).load_state_dict(state)
    # The hand-written schedule's state (before timm's) resumes when its steps agree.
    old = {"t": 7, "peak": 0.4, "total": 20, "warmup": 4}
    again.load_state_dict(old)
    assert again.t == 7
    with pytest.raises(ValueError, match=r"differs from this run.*total: 24 vs 20"):
        again.load_state_dict({**old, "total": 24})


def test_no_decay_groups_hold_1d_params_and_alpha_beta() -> None:
    model = _tiny()
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
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] is False
    assert len(sgd.param_groups) == 1 and sgd.param_groups[0]["weight_decay"] == 1e-4
    nesterov = build_optimizer(model, OptimConfig(nesterov=True), 0.1)
    assert nesterov.defaults["nesterov"] is True and nesterov.defaults["momentum"] == 0.9


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
