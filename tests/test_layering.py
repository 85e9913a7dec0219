"""The layering of pyproject.toml's `[tool.importlinter]` holds, and would catch a breach.

utils -> ops -> layers -> models -> data | analysis -> engine -> the command front ends:
a module imports only from layers below its own. ``make test`` runs ``lint-imports``
too; this test makes a violation fail the test suite on its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason="import-linter is in the dev extra")

ROOT = Path(__file__).resolve().parents[1]
LINT = (
    "from importlinter.cli import lint_imports; "
    "raise SystemExit(lint_imports(no_cache=True, no_logo=True))"
)


def _lint(cwd: Path, src: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-c", LINT], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_import_contracts_are_kept() -> None:
    result = _lint(ROOT, ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(
        ROOT / "src" / "acmix",
        tmp_path / "src" / "acmix",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    # A lazy import inside a function counts as much as one at the top of the module.
    (tmp_path / "src" / "acmix" / "utils" / "_upward.py").write_text(
        "def f():\n    import acmix.engine\n"
    )
    (tmp_path / "src" / "acmix" / "data" / "_sideways.py").write_text(
        "from acmix.analysis import count_macs\n"
    )
    result = _lint(tmp_path, tmp_path / "src")
    assert result.returncode != 0
    assert "acmix.utils is not allowed to import acmix.engine" in result.stdout
    assert "acmix.data is not allowed to import acmix.analysis" in result.stdout
