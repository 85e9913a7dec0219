"""Gradient checkpointing changes memory, never results: same gradients, BatchNorm updated once."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from acmix.models import TEST_CONFIGS
from acmix.models._checkpoint import checkpoint, checkpoint_seq

#: One variant per family (the checkpointing code is per family).
VARIANTS = [
    "acmix_tiny",
    "acmix_resnet26",
    "acmix_san10",
    "acmix_pvt_tiny",
    "acmix_swin_tiny_patch4_window7_224",
]


def _two_steps(name: str, grad_checkpointing: bool):
    cfg = TEST_CONFIGS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, **cfg.kwargs).double().train()
    model.set_grad_checkpointing(grad_checkpointing)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(2, *cfg.input_size, generator=gen, dtype=torch.float64)
        opt.zero_grad()
        model(x).logsumexp(1).sum().backward()
        opt.step()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model.state_dict(), grads


@pytest.mark.parametrize("name", VARIANTS)
def test_grad_checkpointing_updates_batchnorm_once(name: str) -> None:
    plain, plain_grads = _two_steps(name, False)
    ckpt, ckpt_grads = _two_steps(name, True)
    for k, v in plain.items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == int(ckpt[k]) == 2, k
        else:  # running statistics and the weights after two steps
            torch.testing.assert_close(ckpt[k], v, rtol=1e-12, atol=1e-12, msg=k)
    assert plain_grads.keys() == ckpt_grads.keys()
    for k, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[k], g, rtol=1e-10, atol=1e-12, msg=k)


def test_families_with_batchnorm_are_covered() -> None:
    with_bn = [
        n
        for n in VARIANTS
        if any(
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            for m in timm.create_model(n, **TEST_CONFIGS[n].kwargs).modules()
        )
    ]
    assert {"acmix_tiny", "acmix_resnet26", "acmix_san10"} <= set(with_bn)


def test_the_helpers_replay_without_touching_norm_statistics() -> None:
    """Modules, bound methods and sequences: one update per forward, same gradients."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU()) for _ in range(3)]
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    for run in (
        lambda y: checkpoint_seq(blocks, y, every=2),
        lambda y: checkpoint_seq(nn.Sequential(*blocks), y, skip_last=True),
        lambda y: checkpoint(blocks[2].forward, checkpoint(blocks[1], checkpoint(blocks[0], y))),
    ):
        before = [b[1].num_batches_tracked.item() for b in blocks]
        run(x).sum().backward()
        assert [b[1].num_batches_tracked.item() for b in blocks] == [n + 1 for n in before]
