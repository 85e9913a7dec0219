"""Image folders follow the model's channels: grayscale for a 1-channel model (issue 13, item 6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from acmix.cli import main
from acmix.data import DataError, ImageFolder, build_data
from acmix.engine import AugConfig, DataConfig
from tests.data_util import TINY_RUN, make_fake_fmnist


def _gray_folders(root: Path, classes: int = 10, size: int = 28) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            pixels = rng.integers(0, 255, (size, size), dtype=np.uint8)
            Image.fromarray(pixels).save(d / "0.png")
    return root


def test_folder_reader_follows_the_models_channels(tmp_path) -> None:
    root = _gray_folders(tmp_path, classes=3, size=16)
    assert ImageFolder(root / "train", mode="L")[0][0].mode == "L"
    assert ImageFolder(root / "train").num_channels == 3
    cfg = DataConfig(dataset="folder", data_dir=str(root), img_size=16)
    gray = build_data(cfg, AugConfig(crop="none"), in_chans=1)
    x, _ = gray.val[0]
    assert gray.in_chans == 1 and tuple(x.shape) == (1, 16, 16) and len(gray.mean) == 1
    assert build_data(cfg, AugConfig(crop="none")).in_chans == 3  # training default: RGB
    forced = DataConfig(dataset="folder", data_dir=str(root), img_size=16, img_mode="L")
    assert build_data(forced, AugConfig(crop="none")).in_chans == 1
    rgb = DataConfig(dataset="folder", data_dir=str(root), img_mode="RGB")
    with pytest.raises(DataError, match=r"img_mode=RGB reads 3 channel\(s\), the model takes 1"):
        build_data(rgb, AugConfig(), in_chans=1)
    with pytest.raises(DataError, match="the model takes 4"):
        build_data(cfg, AugConfig(), in_chans=4)


def test_eval_a_grayscale_model_on_a_grayscale_folder(tmp_path, capsys) -> None:
    data = make_fake_fmnist(tmp_path / "fmnist", n_train=32, n_test=10)
    run = tmp_path / "run"
    argv = ["train", "-c", "fmnist_tiny", "--data-dir", str(data), "-o", str(run), *TINY_RUN]
    assert main([*argv, "train.stop_after_steps=1"]) == 0
    folders = _gray_folders(tmp_path / "gray")
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(run), "--dataset", "folder", "--data-dir", str(folders)]
    assert main([*argv, "data.img_size=28", "--json"]) == 0, capsys.readouterr().err
    assert '"count": 10' in capsys.readouterr().out
