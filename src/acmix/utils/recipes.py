"""The training recipes shipped with the package, and where a recipe name is looked up.

The YAML recipes live in ``acmix/configs/`` (package data, so an installed
wheel has them; the checkout's top-level ``configs`` links there). A bare name
(``fmnist_tiny``) is looked up first in ``./configs/`` under the working
directory, where ``acmix configs cp`` puts an editable copy, then among the
packaged recipes. Only the standard library is imported: ``acmix configs
list`` answers without loading torch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = [
    "copy_recipe",
    "find_recipe",
    "list_recipes",
    "packaged_recipe_dir",
    "recipe_description",
    "recipe_dirs",
]


def packaged_recipe_dir() -> Path:
    """The folder of the recipes shipped with the package (``acmix/configs``)."""
    return Path(__file__).resolve().parents[1] / "configs"


def recipe_dirs() -> list[Path]:
    """Where bare recipe names are looked up, in order: ``./configs``, the packaged ones."""
    dirs = [Path.cwd() / "configs", packaged_recipe_dir()]
    return [d for i, d in enumerate(dirs) if d.resolve() not in {x.resolve() for x in dirs[:i]}]


def find_recipe(path: str | os.PathLike) -> Path:
    """The recipe file for ``path``: an existing file, or a bare name in :func:`recipe_dirs`.

    Args:
        path: a file path, or a bare name (``fmnist_tiny``, with or without ``.yaml``).

    Returns:
        The file.

    Raises:
        FileNotFoundError: no such recipe; the paths tried and the packaged
            names are in the message.
    """
    p = Path(path)
    if p.is_file():
        return p
    tried = [p]
    if len(p.parts) == 1 and p.suffix in ("", ".yaml", ".yml"):
        for d in recipe_dirs():
            cand = d / (p.name if p.suffix else f"{p.name}.yaml")
            tried.append(cand)
            if cand.is_file():
                return cand
    names = ", ".join(list_recipes())
    raise FileNotFoundError(
        f"recipe not found: tried {', '.join(str(t) for t in tried)}; "
        f"packaged recipes: {names} (`acmix configs list`)"
    )


def list_recipes() -> list[str]:
    """The names of the packaged recipes, sorted."""
    return sorted(f.stem for f in packaged_recipe_dir().glob("*.yaml"))


def recipe_description(name: str) -> str:
    """The first comment line of packaged recipe ``name`` (``""`` when it has none)."""
    text = (packaged_recipe_dir() / f"{name}.yaml").read_text(encoding="utf-8")
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def copy_recipe(name: str, dest: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Copy packaged recipe ``name`` to ``dest`` to edit it (torchtune's ``tune cp``).

    Args:
        name: a packaged recipe name (``acmix configs list``).
        dest: a file or an existing folder; ``None``: ``./configs/<name>.yaml``,
            where a bare ``--config <name>`` finds it before the packaged one.
        force: overwrite an existing file.

    Returns:
        The file written.

    Raises:
        FileNotFoundError: no packaged recipe ``name`` (the names are listed).
        FileExistsError: ``dest`` exists and ``force`` is false.
    """
    stem = name[:-5] if name.endswith(".yaml") else name
    src = packaged_recipe_dir() / f"{stem}.yaml"
    if not src.is_file():
        raise FileNotFoundError(
            f"no packaged recipe {name!r}; packaged recipes: {', '.join(list_recipes())}"
        )
    out = Path(dest) if dest is not None else Path.cwd() / "configs" / src.name
    if out.is_dir():
        out = out / src.name
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out)
    return out
