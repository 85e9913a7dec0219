"""The compiled-kernel cache: two source trees share one cache without rebuilding each other.

The build is keyed by a hash of the kernel's source (and flags, CPU, torch), and
compiled from a copy at a path fixed by that key, so torch's ninja file is the same
for every checkout with that source (issue 11, item 6). Nothing is compiled here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from acmix.ops import cpp


@pytest.fixture
def two_trees(tmp_path) -> tuple[Path, Path]:
    a, b = tmp_path / "checkout_a" / "csrc", tmp_path / "checkout_b" / "csrc"
    shutil.copytree(cpp._CSRC, a)
    shutil.copytree(cpp._CSRC, b)
    return a, b


def _names(monkeypatch, tree: Path) -> dict[str, str]:
    monkeypatch.setattr(cpp, "_CSRC", tree)
    return {k: cpp.build_name(k) for k in cpp._SOURCES}


def test_identical_sources_share_a_build_and_a_changed_one_gets_its_own(
    two_trees, monkeypatch
) -> None:
    a, b = two_trees
    names_a = _names(monkeypatch, a)
    assert _names(monkeypatch, b) == names_a  # another checkout of the same version
    # A new version of one kernel: its build is new, the other kernel's is shared still.
    src = b / cpp._SOURCES["attention"]
    src.write_bytes(src.read_bytes() + b"\n// a changed kernel\n")
    names_b = _names(monkeypatch, b)
    assert names_b["attention"] != names_a["attention"]
    assert names_b["conv_path"] == names_a["conv_path"]
    assert all(n.startswith(f"acmix_{k}_") for k, n in names_b.items())


def test_the_compiled_source_path_does_not_depend_on_the_checkout(
    two_trees, monkeypatch, tmp_path
) -> None:
    """torch's ninja file names the source path: it must be the same for both trees."""
    a, b = two_trees
    cache = tmp_path / "torch_extensions"
    paths = []
    for tree in (a, b, a):
        monkeypatch.setattr(cpp, "_CSRC", tree)
        build = cpp.build_name("conv_path")
        src = cpp._stable_source("conv_path", build, cache / build)
        paths.append((src, src.stat().st_mtime_ns))
        assert src.read_bytes() == (tree / cpp._SOURCES["conv_path"]).read_bytes()
    assert paths[0] == paths[1] == paths[2]  # one file, never rewritten
    assert paths[0][0].parent.parent == cache
