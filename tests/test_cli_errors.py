"""The command line says what is wrong in one line, never with a traceback (issue 11, 10-11)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from acmix.cli import main
from tests.data_util import make_fake_fmnist

TINY = [
    "model.kwargs={stem_stride: 2, widths: [8, 16, 16, 32], depths: [1, 1, 1, 1]}",
    "data.batch_size=16",
    "train.epochs=1",
    "train.threads=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_fake_fmnist(tmp_path_factory.mktemp("fm"), n_train=32, n_test=10)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_full_disk_is_one_line_naming_the_file(data, tmp_path, monkeypatch, capsys) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    out = tmp_path / "full"
    assert main(["train", f"--data-dir={data}", "-o", str(out), *TINY]) == 1
    err = _err(capsys)
    assert err.startswith("acmix train: error: [Errno 28] cannot write ")
    assert str(out / "checkpoints" / "ckpt-00000002") in err and "No space left" in err
    assert not list((out / "checkpoints").glob("*.safetensors"))  # the failed save cleaned up


def test_a_recipe_that_is_not_utf8(tmp_path, capsys) -> None:
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("optim:\n  lr: 0.1  # über\n".encode("latin-1"))
    assert main(["train", "--config", str(recipe)]) == 2
    assert f"acmix train: error: {recipe}: not a UTF-8 text file" in _err(capsys)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("model.kwargs.mixer=bogus", "mixer must be one of .* got 'bogus'"),
        ("model.kwargs.bogus_kw=1", "unexpected keyword argument 'bogus_kw'"),
        ("optim.lr=nan", r"optim\.lr must be finite, got nan"),
        ("sched.min_lr=-1", r"sched\.min_lr must be >= 0.0, got -1.0"),
    ],
)
def test_bad_model_kwargs_and_values_name_them(data, tmp_path, capsys, override, match) -> None:
    argv = ["train", f"--data-dir={data}", "-o", str(tmp_path / "r"), *TINY, override]
    assert main(argv) == 2
    err = _err(capsys)
    assert err.startswith("acmix train: error: ")
    import re

    assert re.search(match, err), err


def test_a_second_run_into_a_running_directory(data, tmp_path, capsys) -> None:
    from acmix.utils.io import exclusive_lock

    out = tmp_path / "busy"
    out.mkdir()
    with exclusive_lock(out / "run.lock", what="a test"):
        assert main(["train", f"--data-dir={data}", "-o", str(out), *TINY]) == 1
    err = _err(capsys)
    assert f"acmix train: error: run directory {out} is in use" in err
    assert f"PID {os.getpid()}" in err and "another train.output" in err


PREDICT = ["predict", "x.png", "--checkpoint", "c"]
EXPORT = ["export", "--model", "acmix_tiny", "-o", "m.onnx"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        ([*PREDICT, "--topk", "-1"], "--topk: must be an integer >= 1, got -1"),
        ([*PREDICT, "--topk", "two"], "--topk: expected an integer >= 1"),
        ([*EXPORT, "--img-size", "0"], "--img-size: must be an integer >= 1, got 0"),
        (["flops", "acmix_tiny", "--img-size", "-32"], "--img-size: must be an integer >= 1"),
        (["inspect", "w.safetensors", "--img-size", "0"], "--img-size: must be an integer >= 1"),
    ],
)
def test_bad_numbers_on_the_command_line(argv, match, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = _err(capsys)
    assert f"acmix {argv[0]}: error: argument {match}" in err


def test_predict_topk_in_the_library(tmp_path) -> None:
    from acmix.engine import load_model, predict_images

    loaded = load_model(None, "acmix_tiny", {"num_classes": 3})
    with pytest.raises(ValueError, match="topk must be an integer >= 1, got 0"):
        predict_images(loaded, [tmp_path / "x.png"], topk=0)


def test_predict_and_export_name_bad_model_args(tmp_path, capsys) -> None:
    argv = ["export", "--model", "acmix_tiny", "-o", str(tmp_path / "m.onnx")]
    assert main([*argv, "--model-arg", "mixer=bogus"]) == 1
    assert "acmix export: error: cannot build 'acmix_tiny'" in _err(capsys)
    assert main([*argv, "--img-size", "8", "--dynamic-hw"]) == 1
    assert "Trace at 49x49 or larger" in _err(capsys)
