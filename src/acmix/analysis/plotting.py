"""The two steps every PNG plot shares: a headless pyplot, and saving a figure to a path."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["pyplot", "save_figure"]


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed).

    Returns:
        The ``matplotlib.pyplot`` module.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (parent folders created) and close it.

    Args:
        fig: a matplotlib figure.
        path: the output file (its suffix picks the format, e.g. ``.png``).
        dpi: resolution.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path
