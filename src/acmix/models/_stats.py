"""Params / MACs recorded next to each registered variant, verified by a test.

Each model file calls :func:`register_stats` beside its ``@register_model``
entrypoint. ``params`` and ``macs`` are what our code builds and counts
(multiply-adds at ``img_size``, attention included, via
:func:`acmix.analysis.count_macs`); ``paper_*`` are the paper's Table
figures; ``official_params`` the authors' released code where it exists.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelStats:
    """Cost metadata of one registered variant.

    Attributes:
        params: parameter count of our model (1000 classes).
        macs: multiply-adds of one 224x224 image (or ``img_size``).
        paper_params: the paper's figure (e.g. ``10.6e6``) or ``None``.
        paper_macs: the paper's FLOPs figure in MACs (e.g. ``2.3e9``) or ``None``.
        official_params: the authors' released code's exact count, or ``None``.
        img_size: input size the MACs were counted at.
        paper_top1: the paper's ImageNet top-1, for tables (no weights shipped).
    """

    params: int
    macs: int
    paper_params: float | None = None
    paper_macs: float | None = None
    official_params: int | None = None
    img_size: int = 224
    paper_top1: float | None = None


MODEL_STATS: dict[str, ModelStats] = {}


def register_stats(name: str, stats: ModelStats) -> None:
    """Record the cost metadata of the registered model ``name``."""
    MODEL_STATS[name] = stats


def get_stats(name: str) -> ModelStats:
    """Cost metadata of ``name``; ``KeyError`` naming the known models otherwise."""
    try:
        return MODEL_STATS[name]
    except KeyError:
        raise KeyError(f"no stats for {name!r}; known: {sorted(MODEL_STATS)}") from None


@dataclass(frozen=True)
class TestConfig:
    """A tiny, fast configuration of a registered model for the registry-wide tests.

    Attributes:
        kwargs: keyword arguments for ``timm.create_model(name, **kwargs)`` that make
            the model small (few channels / blocks) while keeping its structure.
        input_size: ``(C, H, W)`` of a small test input.
    """

    kwargs: dict
    input_size: tuple[int, int, int] = (3, 64, 64)


TEST_CONFIGS: dict[str, TestConfig] = {}


def register_test_config(name: str, config: TestConfig) -> None:
    """Record the tiny test configuration of the registered model ``name``."""
    TEST_CONFIGS[name] = config
