"""What every configuration section shares: :class:`ConfigError` and its value checks.

The sections live with the code they configure (:mod:`acmix.data.config`
for the data and augmentation, :mod:`acmix.engine.config` for the rest and
the whole recipe); each validates itself with these checks, so a bad value
reads the same in every section: the dotted key, the value, what was expected.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ConfigError", "check_config_choice", "check_config_range"]


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


def check_config_range(key: str, value: float, lo: float, hi: float | None = None) -> None:
    """Raise :class:`ConfigError` unless ``lo <= value`` (and ``value <= hi`` when given).

    Args:
        key: the dotted key, for the message (``"optim.lr"``).
        value: the configured value.
        lo: the smallest allowed value.
        hi: the largest allowed value (``None``: no upper bound).
    """
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ConfigError(f"{key} must be {bound}, got {value!r}")
