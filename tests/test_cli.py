"""Smoke runs of the `acmix` commands: train, eval, predict, export, list-models; errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from acmix.cli import build_parser, main
from acmix.data import FASHION_MNIST_CLASSES, INSTALL_FASHION_MNIST, load_fashion_mnist
from tests.data_util import TINY_RUN, make_fake_fmnist


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One small training run through the CLI, shared by the eval / predict / export tests."""
    root = tmp_path_factory.mktemp("cli")
    data = make_fake_fmnist(root / "data", n_train=64, n_test=20)
    out = root / "run"
    argv = ["train", "--config", "fmnist_tiny", "--data-dir", str(data), "-o", str(out)]
    assert main([*argv, "--epochs", "3", "--lr", "0.1", *TINY_RUN]) == 0
    return out


def test_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("train", "eval", "predict", "list-models", "convert", "export", "bench"):
        assert cmd in text
    for cmd in ("train", "eval", "predict", "export", "bench"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "usage: acmix " + cmd in capsys.readouterr().out
    build_parser()  # builds without error


def test_list_models_includes_tiny(capsys) -> None:
    assert main(["list-models"]) == 0
    names = capsys.readouterr().out.split()
    assert "acmix_tiny" in names and "acmix_resnet50" in names


def test_train_writes_a_run(run_dir, capsys) -> None:
    manifest = json.loads((run_dir / "checkpoints" / "last.json").read_text())
    assert manifest["step"] == 12 and manifest["model"]["name"] == "acmix_tiny"
    assert manifest["config"]["optim"]["lr"] == 0.1 and manifest["config"]["train"]["epochs"] == 3
    assert manifest["data"]["classes"] == list(FASHION_MNIST_CLASSES)
    assert (run_dir / "metrics.csv").read_text().count("\n") == 4  # header + 3 epochs


def test_eval_reproduces_the_final_validation(run_dir, capsys) -> None:
    manifest = json.loads((run_dir / "checkpoints" / "last.json").read_text())
    assert main(["eval", "--checkpoint", str(run_dir), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["count"] == 20
    assert metrics["top1"] == pytest.approx(manifest["metrics"]["top1"])
    assert metrics["loss"] == pytest.approx(manifest["metrics"]["loss"], rel=1e-5)
    assert main(["eval", "--checkpoint", str(run_dir / "checkpoints" / "best.json")]) == 0
    assert "top-1" in capsys.readouterr().out


def test_predict_classifies_image_files(run_dir, tmp_path, capsys) -> None:
    data = load_fashion_mnist(run_dir.parent / "data", "test")
    paths = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.fromarray(data.images[i, 0].numpy()).save(p)
        paths.append(str(p))
    assert main(["predict", *paths, "--checkpoint", str(run_dir), "--topk", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["image"] for o in out] == paths
    for o in out:
        assert len(o["top"]) == 3 and o["top"][0]["class"] in FASHION_MNIST_CLASSES
        probs = [t["prob"] for t in o["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # Same answer as the model on the evaluation pipeline (the CLI loads PNG -> grey -> normalise).
    assert main(["predict", paths[0], "--checkpoint", str(run_dir)]) == 0
    assert out[0]["top"][0]["class"] in capsys.readouterr().out
    assert main(["predict", str(tmp_path / "missing.png"), "--checkpoint", str(run_dir)]) == 1
    assert "missing.png" in capsys.readouterr().err


def test_export_checkpoint_to_onnx(run_dir, tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(run_dir), "-o", str(out), "--dynamic-hw"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and text.count("max |diff|") == 3
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((7, 1, 28, 28)).astype(np.float32)
    assert sess.run(None, {"input": x})[0].shape == (7, 10)


def test_export_fresh_model(tmp_path, capsys) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "c.onnx"
    argv = ["export", "--model", "acmix_tiny", "-o", str(out), "--img-size", "32"]
    argv += ["--model-arg", "mixer=conv", "--model-arg", "num_classes=3"]
    assert main(argv) == 0
    assert out.is_file()
    assert main(["export", "-o", str(out)]) == 2
    assert "give --checkpoint or --model" in capsys.readouterr().err


def test_train_errors_are_clear(tmp_path, capsys) -> None:
    data = make_fake_fmnist(tmp_path / "d", n_train=20, n_test=10)
    assert main(["train", "--data-dir", str(data), "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(["train", "--data-dir", str(tmp_path / "empty"), *TINY_RUN]) == 1
    err = capsys.readouterr().err
    assert INSTALL_FASHION_MNIST in err and "--dataset digits" in err
    assert main(["train", "--config", "no_such_recipe"]) == 1
    assert "recipe not found" in capsys.readouterr().err
    argv = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "x"), *TINY_RUN]
    assert main(argv) == 1
    assert "image-folder root not found" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "nope")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


def test_train_on_digits_fallback(tmp_path) -> None:
    pytest.importorskip("sklearn")
    argv = ["train", "--dataset", "digits", "-o", str(tmp_path / "dg"), "--epochs", "1", *TINY_RUN]
    argv += ["model.kwargs.stem_stride=1", "data.train_subset=64"]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "dg" / "checkpoints" / "last.json").read_text())
    from acmix.data import load_digits

    assert manifest["data"]["img_size"] == 8
    assert manifest["metrics"]["count"] == len(load_digits("test")) == 359  # 1797 - 1438


# -- one resolver, self-describing files, timm's .pth.tar ------------------------------------------


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "last.json").read_text())


def test_every_command_accepts_a_run_directory(run_dir, tmp_path, capsys) -> None:
    assert main(["inspect", str(run_dir)]) == 0
    out = capsys.readouterr()
    assert "| depth | layer | α (attention) | β (convolution) |" in out.out
    assert f"loaded acmix checkpoint {run_dir / 'checkpoints' / 'last.json'}" in out.err
    assert main(["eval", "--checkpoint", str(run_dir / "checkpoints"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["count"] == 20
    png = tmp_path / "x.png"
    data = load_fashion_mnist(run_dir.parent / "data", "test")
    Image.fromarray(data.images[0, 0].numpy()).save(png)
    tag = run_dir / "checkpoints" / "best"  # a tag, without .json
    assert main(["predict", str(png), "--checkpoint", str(tag), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] in FASHION_MNIST_CLASSES
    dst = tmp_path / "tiny.safetensors"
    assert main(["convert", str(run_dir), str(dst)]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    assert (tmp_path / "tiny.config.json").is_file()


def test_a_weights_file_alone_evaluates_like_the_run(run_dir, capsys) -> None:
    """No recipe, no --model: the file's architecture, kwargs, normalisation and size."""
    manifest = _manifest(run_dir)
    weights = run_dir / "checkpoints" / manifest["files"]["weights"]["file"]
    argv = ["eval", "--checkpoint", str(weights), "--data-dir", str(run_dir.parent / "data")]
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr()
    metrics = json.loads(out.out.splitlines()[-1])
    assert metrics["top1"] == pytest.approx(manifest["metrics"]["top1"])
    assert metrics["loss"] == pytest.approx(manifest["metrics"]["loss"], rel=1e-5)
    assert "stem_stride=2" in out.err and "input 1x28x28" in out.err
    assert main([*argv, "--model", "acmix_resnet26"]) == 1
    err = capsys.readouterr().err
    assert "--model acmix_resnet26 does not match the checkpoint's architecture acmix_tiny" in err


def test_a_timm_training_checkpoint_evaluates(run_dir, tmp_path, capsys) -> None:
    import argparse

    import torch
    from safetensors.torch import load_file

    manifest = _manifest(run_dir)
    sd = load_file(str(run_dir / "checkpoints" / manifest["files"]["weights"]["file"]))
    d = manifest["data"]
    args = argparse.Namespace(
        model="acmix_tiny",
        num_classes=10,
        in_chans=1,
        img_size=28,
        mean=d["mean"],
        std=d["std"],
        crop_pct=1.0,
        crop_mode="squash",
        interpolation="bilinear",
        model_kwargs=manifest["model"]["kwargs"],
    )
    path = tmp_path / "model_best.pth.tar"
    torch.save(
        {"epoch": 2, "arch": "acmix_tiny", "state_dict": sd, "args": args, "version": 2}, path
    )
    argv = ["eval", "--checkpoint", str(path), "--data-dir", str(run_dir.parent / "data")]
    assert main([*argv, "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.splitlines()[-1])["top1"] == pytest.approx(
        manifest["metrics"]["top1"]
    )
    assert f"loaded timm training checkpoint {path} (epoch 2)" in out.err
    dst = tmp_path / "hf"
    assert main(["convert", str(path), str(dst)]) == 0
    assert json.loads((dst / "config.json").read_text())["model_args"]["stem_stride"] == 2
    assert main(["predict", str(run_dir.parent / "missing.png"), "--checkpoint", str(dst)]) == 1


def test_bad_checkpoints_are_one_clear_line(run_dir, tmp_path, capsys) -> None:
    import os

    import torch

    def err() -> str:
        text = capsys.readouterr().err
        assert "Traceback" not in text
        return text

    state = next((run_dir / "checkpoints").glob("*.state.pt"))
    assert main(["eval", "--checkpoint", str(state)]) == 1
    assert "is a training state (optimizer, RNG), not model weights: pass its manifest" in err()
    (tmp_path / "empty").mkdir()
    assert main(["inspect", str(tmp_path / "empty")]) == 1
    assert f"no checkpoint in {tmp_path / 'empty'}" in err()

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    evil = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"w": torch.ones(1)}, "arch": "acmix_tiny", "args": Evil()}, evil)
    assert main(["predict", "x.png", "--checkpoint", str(evil)]) == 1
    assert "evil.pth.tar" in err()
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.ones(1)}, plain)
    assert main(["convert", str(plain), str(tmp_path / "o.safetensors")]) == 1
    assert "does not say which architecture it holds; pass --model NAME" in err()
    assert main(["export", "--checkpoint", str(plain), "-o", str(tmp_path / "m.onnx")]) == 1
    assert "pass --model NAME" in err()


def test_convert_and_inspect_take_the_ema_weights(tmp_path, capsys) -> None:
    """`--ema` reads the run's EMA file: convert writes exactly it, inspect tabulates it."""
    import torch
    from safetensors.torch import load_file

    from acmix.analysis.inspect import format_rates, rates_from_state_dict
    from acmix.engine import load_checkpoint

    data = make_fake_fmnist(tmp_path / "data", n_train=32, n_test=8)
    out = tmp_path / "run"
    argv = ["train", "--config", "fmnist_tiny", "--data-dir", str(data), "-o", str(out)]
    assert main([*argv, "--epochs", "1", "--lr", "0.1", *TINY_RUN, "train.ema_decay=0.5"]) == 0
    capsys.readouterr()
    ck = load_checkpoint(out, weights_only=True, ema=True)
    assert ck.ema is not None
    assert any(not torch.equal(ck.ema[k], ck.weights[k]) for k in ck.weights)

    dst = tmp_path / "ema.safetensors"
    assert main(["convert", str(out), str(dst), "--ema"]) == 0
    got = load_file(str(dst))
    assert got.keys() == ck.ema.keys()
    assert all(torch.equal(got[k], ck.ema[k]) for k in got)
    capsys.readouterr()

    assert main(["inspect", str(out), "--ema"]) == 0
    res = capsys.readouterr()
    assert "EMA weights" in res.err
    assert format_rates(rates_from_state_dict(ck.ema)) in res.out
    assert format_rates(rates_from_state_dict(ck.weights)) not in res.out  # not the model's
