"""Whole models under torch.compile: no graph break in any family, the same numbers as eager.

The C++ kernels are registered ops, so dynamo captures each model as one graph
(``fullgraph=True``). The tests compile with the ``aot_eager`` backend (graph
capture and AOT autograd without code generation, which would take minutes on
2 CPU cores); the README reports inductor's compile time and speed-up.
"""

from __future__ import annotations

import pytest
import timm
import torch

import acmix  # noqa: F401  (the acmix_* models register on import)

#: One model per family, at the smallest input each accepts quickly.
FAMILIES = [
    ("acmix_tiny", 28),
    ("acmix_resnet26", 64),
    ("acmix_san10", 64),
    ("acmix_pvt_tiny", 64),
    ("acmix_swin_tiny_patch4_window7_224", 224),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_compiles_fullgraph(name: str, size: int) -> None:
    torch._dynamo.reset()
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(1, model.pretrained_cfg["input_size"][0], size, size)
    # fullgraph=True raises at the first graph break (what torch._dynamo.explain would list)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_train_step_compiles_fullgraph() -> None:
    torch._dynamo.reset()
    model = timm.create_model("acmix_tiny", num_classes=10)
    x = torch.randn(2, model.pretrained_cfg["input_size"][0], 28, 28)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        fn(x).logsumexp(1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
