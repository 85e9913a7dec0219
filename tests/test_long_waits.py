"""Long waits are announced on stderr before they start (issue 13, item 8)."""

from __future__ import annotations

import types

import torch

from acmix.cli import main
from acmix.ops import cpp
from tests.data_util import TINY_RUN, make_fake_fmnist


def test_a_kernel_build_says_how_long_it_takes_before_it_starts(
    monkeypatch, tmp_path, capsys
) -> None:
    import torch.utils.cpp_extension as ext

    said_before: list[str] = []

    def fake_load(**kwargs):
        said_before.append(capsys.readouterr().err)  # what stderr held when the build began
        return types.SimpleNamespace()

    monkeypatch.setattr(cpp, "_state", {})
    monkeypatch.delenv("ACMIX_NO_CPP", raising=False)
    monkeypatch.setattr(ext, "load", fake_load)
    monkeypatch.setattr(ext, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    assert cpp.kernel("attention") is not None
    (before,) = said_before
    assert "building the C++ kernel 'attention'" in before
    assert "30-90 s" in before and str(tmp_path) in before
    assert "built 'attention' in" in capsys.readouterr().err


def test_model_compile_is_announced_before_the_first_step(monkeypatch, tmp_path, capsys) -> None:
    said_before: list[str] = []

    def fake_compile(module, *args, **kwargs):
        def first_call(*a, **k):
            if not said_before:
                said_before.append(capsys.readouterr().err)
            return module(*a, **k)

        return first_call

    monkeypatch.setattr(torch, "compile", fake_compile)
    data = make_fake_fmnist(tmp_path / "data", n_train=32, n_test=10)
    argv = ["train", "-c", "fmnist_tiny", "--data-dir", str(data), "-o", str(tmp_path / "run")]
    assert main([*argv, *TINY_RUN, "model.compile=true", "train.stop_after_steps=1"]) == 0
    assert said_before and "model.compile=true: the first training step" in said_before[0]
    assert "1-10 min" in said_before[0]
