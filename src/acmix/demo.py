"""``python -m acmix.demo``: ACmix in one minute.

Builds an ACmix layer, checks the fast path against the reference path
(the authors' algorithm) forward and backward, checks the convolution path
at the paper's init against an explicit shift-and-sum, and prints a short
table of parameters, multiply-adds and time next to the 3x3 convolution the
layer replaces.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from acmix.analysis import count_macs, count_params
from acmix.layers import ACmix


def _time(fn, reps: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    """Run the demo and print its report."""
    torch.manual_seed(0)
    C, H = 64, 28
    x = torch.randn(2, C, H, H, dtype=torch.float64)

    fast = ACmix(C, C).double()
    ref = ACmix(C, C, backend="reference").double()
    ref.load_state_dict(fast.state_dict())
    xf = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    yf, yr = fast(xf), ref(xr)
    g = torch.randn_like(yf)
    (yf * g).sum().backward()
    (yr * g).sum().backward()
    print("ACmix(64 -> 64, k_att=7, 4 heads, k_conv=3) on (2, 64, 28, 28), float64:")
    print(f"  fast vs reference path  output   max |diff| = {(yf - yr).abs().max():.2e}")
    print(f"  fast vs reference path  d input  max |diff| = {(xf.grad - xr.grad).abs().max():.2e}")

    conv_only = ACmix(C, C, paths="conv", shift_mode="learnable").double()
    tensor_shift = ACmix(C, C, paths="conv", shift_mode="tensor").double()
    tensor_shift.load_state_dict(
        {k: v for k, v in conv_only.state_dict().items() if "dep_conv" not in k}
    )
    diff = (conv_only(x) - tensor_shift(x)).abs().max()
    print(f"  paper init: group conv vs explicit shift-and-sum max |diff| = {diff:.2e}")

    print("\nCost per image at 64 x 56 x 56 (float32, this machine):")
    print("| layer | params | MMACs | fwd ms (batch 8) |")
    print("|---|---|---|---|")
    xb = torch.randn(8, C, 56, 56)
    for name, layer in (
        ("nn.Conv2d 3x3", nn.Conv2d(C, C, 3, padding=1)),
        ("ACmix", ACmix(C, C)),
        ("ACmix attention path only", ACmix(C, C, paths="attn")),
        ("ACmix reference path", ACmix(C, C, backend="reference")),
    ):
        macs = count_macs(layer.eval(), (1, C, 56, 56)).total
        with torch.no_grad():
            t = _time(lambda layer=layer: layer(xb))
        print(f"| {name} | {count_params(layer):,} | {macs / 1e6:.1f} | {t * 1e3:.1f} |")


if __name__ == "__main__":
    main()
