"""The README's main job (python -m acmix.demo_train): its recipe, a smoke run, missing data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from acmix.data import INSTALL_FASHION_MNIST
from acmix.demo_train import demo_config, main
from acmix.engine import load_config
from tests.data_util import make_fake_fmnist

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_demo_runs_the_quick_recipe() -> None:
    recipe = load_config(CONFIGS / "fmnist_tiny_quick.yaml")
    demo = demo_config("acmix", recipe.train.output)
    assert demo.model == recipe.model and demo.data == recipe.data
    assert (demo.aug, demo.optim, demo.sched) == (recipe.aug, recipe.optim, recipe.sched)
    assert dataclasses.replace(demo.train, plots=recipe.train.plots) == recipe.train
    # The baselines differ in the mixer only.
    conv = demo_config("conv", recipe.train.output)
    assert conv.model.kwargs == {**recipe.model.kwargs, "mixer": "conv"}
    assert dataclasses.replace(conv, model=demo.model) == demo


def test_demo_smoke(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    data = make_fake_fmnist(tmp_path / "d", n_train=64, n_test=40)
    argv = ["--data-dir", str(data), "--train-images", "64", "-o", str(tmp_path / "out")]
    assert main([*argv, "--threads", "1", "--quiet"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(table) == 4  # header + ACmix, conv, attention
    assert "ACmix" in table[1] and "convolution only" in table[2] and "attention only" in table[3]
    assert "on all 40 test images" in out
    for name in ("comparison.png", "alpha_beta.png"):
        assert f"plot: {(tmp_path / 'out' / name).resolve()}" in out
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"


def test_demo_without_the_data_says_how_to_get_it(tmp_path, capsys) -> None:
    assert main(["--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert INSTALL_FASHION_MNIST in err and "--dataset digits" in err
