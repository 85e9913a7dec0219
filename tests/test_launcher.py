"""The ``acmix`` console script reads its command line before it imports torch and timm."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Runs the launcher as the console script does, then reports what was imported.
PROBE = """
import json, sys
import _acmix_launcher
try:
    code = _acmix_launcher.main(sys.argv[1:])
except SystemExit as e:
    code = e.code
acmix = sys.modules.get("acmix")
print(json.dumps({
    "code": code,
    "torch": "torch" in sys.modules,
    "timm": "timm" in sys.modules,
    "acmix_initialised": hasattr(acmix, "ACmix"),
}))
"""


def _probe(*argv: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    assert lines, proc.stderr
    return json.loads(lines[-1]), proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"], []])
def test_help_imports_neither_torch_nor_timm(argv: list[str]) -> None:
    report, out = _probe(*argv)
    assert report["code"] in (0, None), out
    assert "usage: acmix" in out
    assert not report["torch"] and not report["timm"], report


def test_a_bad_option_is_refused_before_torch_is_imported() -> None:
    report, out = _probe("train", "--no-such-option")
    assert report["code"] == 2
    assert "unrecognized arguments: --no-such-option" in out
    assert not report["torch"], report


def test_a_command_runs_on_the_whole_package() -> None:
    """After parsing, acmix/__init__ runs as `import acmix` would: models are registered."""
    report, out = _probe("list-models", "acmix_tiny")
    assert report == {"code": 0, "torch": True, "timm": True, "acmix_initialised": True}, out
    assert "acmix_tiny" in out


def test_the_console_script_is_the_launcher() -> None:
    (script,) = entry_points(group="console_scripts", name="acmix")
    assert script.value == "_acmix_launcher:main"
