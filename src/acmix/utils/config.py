"""What every configuration section shares: :class:`ConfigError` and its value checks.

The sections live with the code they configure (:mod:`acmix.data.config`
for the data and augmentation, :mod:`acmix.engine.config` for the rest and
the whole recipe); each validates itself with these checks, so a bad value
reads the same in every section: the dotted key, the value, what was expected.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

__all__ = ["ConfigError", "check_config_choice", "check_config_finite", "check_config_range"]


class ConfigError(ValueError):
    """A recipe or override that does not fit the configuration (the message names the key)."""


def check_config_choice(key: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``choices``.

    Args:
        key: the dotted key, for the message (``"data.dataset"``).
        value: the configured value.
        choices: the allowed values.
    """
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def check_config_range(
    key: str,
    value: float,
    lo: float,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Raise :class:`ConfigError` unless ``value`` is finite and within ``[lo, hi]``.

    NaN fails every comparison, so the bounds are checked as ``not (lo <= value)``
    and a non-finite value (NaN, +-inf) is refused before any bound.

    Args:
        key: the dotted key, for the message (``"optim.lr"``).
        value: the configured value.
        lo: the smallest allowed value.
        hi: the largest allowed value (``None``: no upper bound).
        lo_open: ``lo`` itself is not allowed (``value > lo``).
        hi_open: ``hi`` itself is not allowed (``value < hi``).
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    above = value > lo if lo_open else value >= lo
    below = hi is None or (value < hi if hi_open else value <= hi)
    if not (above and below):
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        bound = (
            f"in {left}{lo}, {hi}{right}"
            if hi is not None
            else (f"> {lo}" if lo_open else f">= {lo}")
        )
        raise ConfigError(f"{key} must be {bound}, got {value!r}")


def check_config_finite(section: str, obj: Any) -> None:
    """Raise :class:`ConfigError` for any non-finite float in the dataclass ``obj``.

    Every field of the section is looked at, so a float field added later is
    covered without a line of its own: a float, or floats in a tuple / list,
    must be finite (NaN and +-inf pass the ``<`` checks of a plain range test).

    Args:
        section: the section's name, for the message (``"optim"``).
        obj: the section (a dataclass instance).
    """
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        items = value if isinstance(value, tuple | list) else (value,)
        for item in items:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{section}.{f.name} must be finite, got {value!r}")
