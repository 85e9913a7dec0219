"""A run's files describe themselves: loaded by path alone they predict what the run predicts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from acmix.data import build_data, build_eval_transform
from acmix.engine import CheckpointError, load_checkpoint, load_model, predict_images, train
from acmix.engine.checkpoint import ModelDescription, save_checkpoint
from acmix.engine.inference import save_described_weights
from tests.data_util import make_fake_fmnist
from tests.engine.test_train import _cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run with EMA (test_train's TINY recipe) on a fake Fashion-MNIST."""
    root = tmp_path_factory.mktemp("inference")
    data_dir = make_fake_fmnist(root / "data", n_train=48, n_test=20)
    cfg = _cfg(data_dir, root / "run", "train.epochs=1")
    result = train(cfg, log=lambda _: None)
    return cfg, result


def _files(run) -> dict[str, Path]:
    _, result = run
    d = result.output / "checkpoints"
    files = json.loads((d / "last.json").read_text())["files"]
    return {kind: d / entry["file"] for kind, entry in files.items()}


def _pngs(run, tmp_path: Path, n: int = 6) -> list[Path]:
    cfg, _ = run
    data = build_data(cfg.data, cfg.aug)
    paths = []
    for i in range(n):
        img = data.val.images[i, 0].numpy()  # type: ignore[attr-defined]
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def test_weights_file_alone_gives_the_runs_logits(run, tmp_path) -> None:
    """Path only: the right kwargs (stem_stride=2, ...), the run's normalisation and size."""
    cfg, result = run
    loaded = load_model(_files(run)["weights"])
    assert loaded.name == cfg.model.name and loaded.kwargs["stem_stride"] == 2
    # The normalisation the run trained and evaluated with, to the last bit (recomputing the
    # data's statistics in another process can differ in the last place).
    manifest = json.loads((result.output / "checkpoints" / "last.json").read_text())
    for key in ("mean", "std", "img_size", "classes", "crop_pct", "center_crop"):
        assert loaded.data[key] == manifest["data"][key], key
    assert loaded.data["img_size"] == 28 and loaded.data["in_chans"] == 1
    run_tf = build_eval_transform(
        28, tuple(manifest["data"]["mean"]), tuple(manifest["data"]["std"]), center_crop=False
    )
    paths = _pngs(run, tmp_path)
    x = torch.stack([run_tf(Image.open(p).convert("L")) for p in paths])
    with torch.no_grad():
        expected = result.model.eval()(x)
        assert torch.equal(loaded.model(x), expected)
    # predict_images (PNG -> the checkpoint's own transform) gives the run model's answer.
    probs = expected.softmax(dim=1)
    top = predict_images(loaded, paths, topk=2)
    for row, res in zip(probs, top, strict=True):
        val, idx = row.topk(2)
        assert [c for c, _ in res] == [loaded.data["classes"][i] for i in idx.tolist()]
        assert [p for _, p in res] == pytest.approx(val.tolist(), rel=0, abs=0)


def test_config_json_rebuilds_the_model_with_timm(run, tmp_path) -> None:
    cfg_json = json.loads(_files(run)["config"].read_text())
    model = timm.create_model(
        cfg_json["architecture"], num_classes=cfg_json["num_classes"], **cfg_json["model_args"]
    )
    model.load_state_dict(load_file(str(_files(run)["weights"])))  # strict: every key, shape
    assert model.num_features == cfg_json["num_features"]
    pcfg = cfg_json["pretrained_cfg"]
    loaded = load_model(_files(run)["weights"])
    assert pcfg["input_size"] == [1, 28, 28] and pcfg["mean"] == loaded.data["mean"]
    assert pcfg["num_classes"] == cfg_json["num_classes"] == 10
    # The Hugging Face / timm folder layout loads through timm's own local-dir: source.
    out = save_described_weights(loaded, tmp_path / "hf")
    assert [p.name for p in out] == ["model.safetensors", "config.json"]
    hub = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(hub(x), loaded.model(x))
    data_cfg = timm.data.resolve_data_config({}, model=hub)
    assert data_cfg["input_size"] == (1, 28, 28)
    assert list(data_cfg["mean"]) == loaded.data["mean"]
    assert data_cfg["crop_pct"] == 1.0 and data_cfg["crop_mode"] == "squash"


def test_ema_file_holds_the_ema_weights(run) -> None:
    files = _files(run)
    ema_sd = load_file(str(files["ema"]))
    ck = load_checkpoint(files["weights"].parent, ema=True)
    assert "ema" not in ck.state  # stored once, in its own file
    assert ema_sd.keys() == ck.ema.keys()
    assert all(torch.equal(ema_sd[k], ck.ema[k]) for k in ema_sd)
    assert not all(torch.equal(ema_sd[k], ck.weights[k]) for k in ema_sd)  # decay 0.9: differs
    by_file = load_model(files["ema"])
    by_flag = load_model(files["weights"].parent, ema=True)
    assert "EMA weights" in by_file.found and "EMA weights" in by_flag.found
    for k, v in by_file.model.state_dict().items():
        assert torch.equal(v, ema_sd[k]) and torch.equal(by_flag.model.state_dict()[k], v)
    with pytest.raises(CheckpointError, match=r"no EMA weights .* the EMA weights are .*\.ema\."):
        load_model(files["weights"], ema=True)


def test_flags_override_and_a_wrong_model_is_named(run) -> None:
    files = _files(run)
    with pytest.raises(ValueError, match="--model acmix_resnet26 does not match .* acmix_tiny"):
        load_model(files["weights"], "acmix_resnet26")
    assert load_model(files["weights"], "acmix_tiny").name == "acmix_tiny"
    with pytest.raises(CheckpointError, match="weights do not fit acmix_tiny"):
        load_model(files["weights"], model_kwargs={"stem_stride": 1, "widths": [8, 8, 8, 8]})


def test_older_checkpoints_without_a_description_still_load(run, tmp_path) -> None:
    """Before this format: weights metadata {format, step}; model / data in the manifest."""
    files = _files(run)
    manifest = json.loads(files["weights"].with_suffix("").with_suffix(".json").read_text())
    weights = load_file(str(files["weights"]))
    info = {k: manifest[k] for k in ("model", "data", "config")}
    old = tmp_path / "old"
    save_checkpoint(old, 3, weights, {"step": 3}, info=info)
    assert not list(old.glob("*.config.json"))
    loaded = load_model(old)
    assert loaded.kwargs["stem_stride"] == 2 and loaded.data["mean"] == manifest["data"]["mean"]
    bare = old / "ckpt-00000003.safetensors"
    with pytest.raises(ValueError, match="does not say which architecture .* pass --model"):
        load_model(bare)
    kwargs = {**manifest["model"]["kwargs"], "num_classes": 10, "in_chans": 1}
    assert load_model(bare, "acmix_tiny", kwargs).data["img_size"] == 224  # timm's defaults


def test_timm_training_checkpoint_loads_with_its_args(run, tmp_path) -> None:
    cfg, result = run
    loaded = load_model(_files(run)["weights"])
    sd = result.model.state_dict()
    path = tmp_path / "checkpoint-1.pth.tar"
    args = argparse.Namespace(
        model=cfg.model.name,
        num_classes=10,
        in_chans=1,
        input_size=[1, 28, 28],
        mean=loaded.data["mean"],
        std=loaded.data["std"],
        crop_pct=1.0,
        crop_mode="squash",
        interpolation="bilinear",
        model_kwargs=dict(cfg.model.kwargs),
    )
    state = {"epoch": 1, "arch": cfg.model.name, "args": args, "version": 2}
    torch.save({**state, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    got = load_model(path)
    assert got.found.startswith(f"timm training checkpoint {path} (epoch 1)")
    assert got.data == {**loaded.data, "classes": [str(i) for i in range(10)]}  # no names
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(got.model(x), loaded.model(x))
    with pytest.raises(CheckpointError, match="holds no EMA weights"):
        load_model(path, ema=True)


def test_description_round_trips() -> None:
    d = ModelDescription.from_run(
        "acmix_tiny",
        {"layers": (1, 1), "num_classes": 99},
        3,
        3,
        {
            "img_size": 64,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "crop_pct": 0.9,
            "center_crop": True,
            "interpolation": "bicubic",
            "classes": ["a", "b", "c"],
        },
    )
    assert d.model_args == {"layers": [1, 1]}  # JSON values; num_classes is the data's
    assert ModelDescription.from_config(json.loads(d.to_config_bytes()), "c") == d
    assert ModelDescription.from_metadata(d.to_metadata(), "m") == d
    assert ModelDescription.from_metadata({"format": "pt"}, "m") is None


def test_a_folder_that_timm_wrote_loads_with_its_config(tmp_path) -> None:
    """timm's own save_config_for_hf + model.safetensors: its config.json is used."""
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    kwargs = {"stem_stride": 2, "widths": [8, 16, 16, 32], "depths": [1, 1, 1, 1]}
    model = timm.create_model("acmix_tiny", num_classes=4, **kwargs).eval()
    data_cfg = {"input_size": (3, 40, 40), "mean": (0.5,) * 3, "std": (0.25,) * 3}
    data_cfg.update(crop_pct=0.9, interpolation="bicubic")
    save_config_for_hf(
        model,
        tmp_path / "config.json",
        model_config={"label_names": list("abcd")},
        data_config=data_cfg,
    )
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = load_model(tmp_path)
    assert loaded.kwargs["stem_stride"] == 2 and loaded.kwargs["num_classes"] == 4
    d = loaded.data
    assert (d["img_size"], d["mean"], d["std"]) == (40, [0.5] * 3, [0.25] * 3)
    assert (d["crop_pct"], d["interpolation"], d["classes"]) == (0.9, "bicubic", list("abcd"))
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
