"""The paper's backbones, registered with timm on import.

One configurable class per family; the token mixer is a config value
(``mixer="acmix" | "conv" | "attn"``), so the plain baselines come from the
same code.
"""

from acmix.models._stats import MODEL_STATS, ModelStats, get_stats, register_stats

__all__ = ["MODEL_STATS", "ModelStats", "get_stats", "register_stats"]
