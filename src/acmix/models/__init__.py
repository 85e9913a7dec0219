"""The paper's backbones, registered with timm on import.

One configurable class per family; the token mixer is a config value
(``mixer="acmix" | "attn" | "acmix_conv" | "conv"`` or a callable, one meaning
per name in every family: :mod:`acmix.layers.factory`), so the plain
baselines come from the same code.
"""

# Model families (each registers its variants with timm on import):
from acmix.models import pvt, resnet, san, swin, tiny  # noqa: F401
from acmix.models._stats import (
    MODEL_STATS,
    TEST_CONFIGS,
    ModelStats,
    TestConfig,
    get_stats,
    register_stats,
    register_test_config,
)

__all__ = [
    "MODEL_STATS",
    "TEST_CONFIGS",
    "ModelStats",
    "TestConfig",
    "get_stats",
    "register_stats",
    "register_test_config",
]
