"""Shared helpers for the fixture-based parity tests (see ``../shared/fixtures/README.md``).

The whole-model fixtures (cases 07 and 08) do not ship their weights: every
non-structural float entry is a deterministic function of
``(seed, salt, key, shape)``, so any model with the authors' key names can
rebuild the exact state dict. :func:`fixture_weight` is that function and
:func:`regenerate_state_dict` rebuilds a case's full state dict. Load the
fixtures with ``tests.conftest.load_fixture``.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

#: Keys that are not weights (buffers the model computes, counters).
STRUCTURAL: tuple[str, ...] = ("relative_position_index", "attn_mask", "num_batches_tracked")


def fixture_weight(
    seed: int, salt: str, key: str, shape: tuple[int, ...] | list[int]
) -> torch.Tensor:
    """The fixtures' key-seeded weight recipe (``key-seeded-uniform-v1``), float64.

    Args:
        seed: the case's ``weights_seed``.
        salt: the case's ``weights_salt``.
        key: the authors' state-dict key.
        shape: the entry's shape.

    Returns:
        A float64 tensor of ``shape``, a function of the four arguments only.
    """
    g = torch.Generator()
    g.manual_seed(zlib.crc32(f"{seed}:{salt}/{key}".encode()))
    u = torch.rand(tuple(shape), dtype=torch.float64, generator=g)
    s = 2 * u - 1
    last = key.rsplit(".", 1)[-1]
    if last in ("rate1", "rate2"):
        return 0.3 + 0.9 * u
    if last == "running_var":
        return 0.5 + u
    if last == "running_mean":
        return 0.3 * s
    if last == "relative_position_bias_table":
        return 0.5 * s
    if len(shape) >= 2:
        return s * math.sqrt(3.0 / math.prod(shape[1:]))
    if last == "weight":
        return 1.0 + 0.3 * s
    return 0.3 * s


def regenerate_state_dict(fx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rebuild a fixture's full state dict from its recipe, in the authors' key order.

    Float entries come from :func:`fixture_weight`; ``num_batches_tracked`` is a
    zero int64 scalar. Other structural buffers (``relative_position_index``,
    ``attn_mask``) are computed by the model and therefore left out.

    Args:
        fx: a loaded fixture with ``weights_seed``, ``weights_salt`` and
            ``state_dict_shapes``.

    Returns:
        ``{key: tensor}`` (float64 weights).
    """
    seed, salt = fx["weights_seed"], fx["weights_salt"]
    sd: dict[str, torch.Tensor] = {}
    for key, shape in fx["state_dict_shapes"].items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.zeros((), dtype=torch.int64)
        elif key.endswith(STRUCTURAL):
            continue
        else:
            sd[key] = fixture_weight(seed, salt, key, shape)
    return sd


def authors_resnet_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Wrap a state dict as the authors' ResNet ``main.py`` saves it.

    Their training wraps the model in (Distributed)DataParallel, so every key
    has a ``module.`` prefix, and ``save_checkpoint`` stores
    ``{'epoch', 'arch', 'state_dict', 'best_acc1' (a tensor), 'optimizer', 'scheduler'}``.
    """
    return {
        "epoch": 90,
        "arch": "acmix_resnet",
        "state_dict": {f"module.{k}": v for k, v in state_dict.items()},
        "best_acc1": torch.tensor(77.8),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]},
        "scheduler": {"last_epoch": 90},
    }
