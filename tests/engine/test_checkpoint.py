"""Checkpoints: round trip, atomic writes, corrupt / truncated files, no unpickling, RNG."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from acmix.engine import checkpoint as ckpt
from acmix.engine.checkpoint import (
    CheckpointError,
    ModelDescription,
    atomic_write_bytes,
    get_rng_state,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    set_rng_state,
)

#: A description for the fake weights below (checkpoint tests never build the model).
DESC = ModelDescription(
    architecture="acmix_tiny",
    model_args={"stem_stride": 2, "widths": [8, 16, 16, 32], "depths": [1, 1, 1, 1]},
    num_classes=10,
    in_chans=1,
    input_size=(1, 28, 28),
    mean=(0.286,),
    std=(0.353,),
    crop_pct=1.0,
    crop_mode="squash",
    interpolation="bilinear",
    img_mode="L",
    label_names=tuple(f"c{i}" for i in range(10)),
    num_features=32,
)


def _weights(v: float) -> dict[str, torch.Tensor]:
    return {
        "a.weight": torch.full((3, 2), v),
        "a.bias": torch.arange(3.0) + v,
        "n": torch.tensor(7),
    }


def _state(step: int) -> dict:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    return {"optimizer": opt.state_dict(), "step": step, "rng": get_rng_state(), "name": "x"}


def test_round_trip(tmp_path) -> None:
    path = save_checkpoint(tmp_path, 5, _weights(1.0), _state(5), info={"metrics": {"top1": 9.5}})
    ck = load_checkpoint(tmp_path)  # the directory resolves to last.json
    assert ck.path == tmp_path / "last.json"
    assert ck.manifest["step"] == 5 and ck.manifest["metrics"] == {"top1": 9.5}
    for k, v in _weights(1.0).items():
        assert torch.equal(ck.weights[k], v)
    assert ck.state["step"] == 5 and ck.state["name"] == "x"
    buf = ck.state["optimizer"]["state"][0]["momentum_buffer"]
    assert torch.equal(buf, torch.ones(2))
    # The weights file is a plain safetensors file (timm / safetensors can read it alone).
    w = load_file(str(tmp_path / json.loads(path.read_text())["files"]["weights"]["file"]))
    assert torch.equal(w["a.bias"], _weights(1.0)["a.bias"])


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path) -> None:
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    digest = atomic_write_bytes(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    import hashlib

    assert digest == hashlib.sha256(b"new contents").hexdigest()
    assert os.listdir(tmp_path) == ["f.bin"]


def test_failed_write_keeps_the_previous_good_checkpoint(tmp_path, monkeypatch) -> None:
    save_checkpoint(tmp_path, 1, _weights(1.0), _state(1))
    real_replace = os.replace
    calls = {"n": 0}

    def crash_on_second_file(src, dst):  # the disk "fails" after the weights are in place
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_second_file)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, _weights(2.0), _state(2))
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path)
    assert ck.manifest["step"] == 1 and torch.equal(
        ck.weights["a.weight"], _weights(1.0)["a.weight"]
    )
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("which", ["weights", "state"])
def test_truncated_file_is_a_clear_error(tmp_path, which: str) -> None:
    path = save_checkpoint(tmp_path, 3, _weights(1.0), _state(3))
    f = tmp_path / json.loads(path.read_text())["files"][which]["file"]
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match=f"{f}.*truncated"):
        load_checkpoint(tmp_path)


def test_corrupt_file_is_a_clear_error(tmp_path) -> None:
    path = save_checkpoint(tmp_path, 3, _weights(1.0), _state(3))
    f = tmp_path / json.loads(path.read_text())["files"]["weights"]["file"]
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF  # same size, one flipped byte
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{f} is corrupt"):
        load_checkpoint(tmp_path)


def test_bad_manifest_and_missing_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "x.json")
    (tmp_path / "last.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / "last.json").write_text('{"format": "other"}')
    with pytest.raises(CheckpointError, match="not an acmix checkpoint"):
        load_checkpoint(tmp_path)
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(bad)


class Evil:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path) -> None:
    path = save_checkpoint(tmp_path, 1, _weights(1.0), _state(1))
    manifest = json.loads(path.read_text())
    buf = io.BytesIO()
    torch.save({"step": 1, "payload": Evil()}, buf)
    data = buf.getvalue()
    f = tmp_path / manifest["files"]["state"]["file"]
    f.write_bytes(data)
    # A consistent manifest (the attacker fixed the hashes, the manifest's own too): refused.
    import hashlib

    manifest["files"]["state"].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (tmp_path / "last.json").write_bytes(ckpt.manifest_bytes(manifest))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(tmp_path)


def test_keep_n_prunes_untagged_checkpoints(tmp_path) -> None:
    save_checkpoint(tmp_path, 1, _weights(1.0), _state(1), tags=("last", "best"), keep=2)
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, _weights(step), _state(step), keep=2)
    stems = sorted(p.name.split(".")[0] for p in tmp_path.glob("ckpt-*.json"))
    assert stems == ["ckpt-00000001", "ckpt-00000003", "ckpt-00000004"]  # 1 is "best"
    assert load_checkpoint(tmp_path / "best.json").manifest["step"] == 1
    assert load_checkpoint(tmp_path).manifest["step"] == 4
    assert len(list(tmp_path.glob("*.safetensors"))) == 3


def test_same_step_saved_twice_never_rewrites_referenced_files(tmp_path) -> None:
    first = save_checkpoint(tmp_path, 7, _weights(1.0), _state(7), tags=("best",), keep=5)
    second = save_checkpoint(tmp_path, 7, _weights(2.0), _state(7), keep=5)
    assert first != second
    assert torch.equal(load_checkpoint(first).weights["a.weight"], _weights(1.0)["a.weight"])
    assert torch.equal(load_checkpoint(tmp_path).weights["a.weight"], _weights(2.0)["a.weight"])


def test_rng_state_round_trip_through_a_checkpoint(tmp_path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached gaussian in numpy's state
    save_checkpoint(tmp_path, 1, _weights(1.0), {"rng": get_rng_state()})
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(load_checkpoint(tmp_path).state["rng"])
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


# -- integrity of every file: one flipped bit anywhere is an error naming the file --------------


def _flip(path, pos: int, bit: int) -> bytes:
    data = path.read_bytes()
    flipped = bytearray(data)
    flipped[pos] ^= 1 << bit
    path.write_bytes(bytes(flipped))
    return data


@pytest.mark.parametrize("which", ["weights", "ema", "config", "state", "manifest", "last", "best"])
def test_a_flipped_bit_in_any_checkpoint_file_is_an_error_naming_it(tmp_path, which) -> None:
    info = {"metrics": {"top1": 9.5}, "data": {"mean": [0.2860], "std": [0.3530]}}
    path = save_checkpoint(
        tmp_path,
        5,
        _weights(1.0),
        _state(5),
        tags=("last", "best"),
        info=info,
        ema=_weights(0.5),
        description=DESC,
    )
    files = json.loads(path.read_text())["files"]
    target, entry = {
        "weights": (tmp_path / files["weights"]["file"], tmp_path / "last.json"),
        "ema": (tmp_path / files["ema"]["file"], tmp_path / "last.json"),
        "config": (tmp_path / files["config"]["file"], tmp_path / "last.json"),
        "state": (tmp_path / files["state"]["file"], tmp_path / "last.json"),
        "manifest": (path, path),
        "last": (tmp_path / "last.json", tmp_path),
        "best": (tmp_path / "best.json", tmp_path / "best.json"),
    }[which]
    size = target.stat().st_size
    rng = random.Random(which)
    # Every byte of a JSON file (its keys, digits, whitespace, checksum), a sample of the others.
    positions = range(size) if target.suffix == ".json" else rng.sample(range(size), 150)
    for pos in positions:
        original = _flip(target, pos, rng.randrange(8))
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(entry, weights_only=which != "state", ema=which == "ema")
        assert str(target) in str(e.value), (pos, str(e.value))
        target.write_bytes(original)
    assert load_checkpoint(entry).manifest["data"]["mean"] == [0.2860]


def test_manifest_checksum_is_over_the_bytes(tmp_path) -> None:
    path = save_checkpoint(tmp_path, 1, _weights(1.0), _state(1), info={"data": {"mean": [0.5]}})
    text = path.read_text()
    assert '"manifest_sha256": "' in text and '"version": 2' in text
    # Same meaning, different bytes (an edit by hand): still refused, never silently read.
    assert text.count(" 0.5\n") == 1
    path.write_text(text.replace(" 0.5\n", " 5e-1\n"))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)
    # A section renamed consistently (checksum recomputed) is named, not a KeyError.
    manifest = json.loads(text)
    manifest["filez"] = manifest.pop("files")
    path.write_bytes(ckpt.manifest_bytes(manifest))
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt manifest \(files\.weights"):
        load_checkpoint(path)


def test_version_1_manifests_still_load(tmp_path) -> None:
    path = save_checkpoint(tmp_path, 1, _weights(1.0), _state(1))
    manifest = json.loads(path.read_text())
    del manifest["manifest_sha256"]
    manifest["version"] = 1
    path.write_text(json.dumps(manifest))
    assert load_checkpoint(path).manifest["step"] == 1


# -- leftovers, modes ----------------------------------------------------------------------------


def test_leftovers_of_crashes_are_removed_by_the_next_save(tmp_path) -> None:
    save_checkpoint(tmp_path, 1, _weights(1.0), _state(1), tags=("last", "best"), keep=1)
    save_checkpoint(tmp_path, 2, _weights(2.0), _state(2), keep=1)
    junk = [
        tmp_path / ".ckpt-00000003.safetensors.k2j4h5.tmp",  # killed mid-write
        tmp_path / ".last.json.abcdef.tmp",
        tmp_path / "ckpt-00000003.safetensors",  # written, then the disk filled up
        tmp_path / "ckpt-00000003.state.pt",
        tmp_path / "ckpt-00000000-2.safetensors",
    ]
    for p in junk:
        p.write_bytes(b"x" * 1000)
    assert sorted(p.name for p in ckpt.clean_checkpoint_dir(tmp_path)) == sorted(
        p.name for p in junk
    )
    for p in junk:
        p.write_bytes(b"x" * 1000)
    save_checkpoint(tmp_path, 4, _weights(4.0), _state(4), keep=1)
    assert not any(p.exists() for p in junk)
    # What a manifest or tag refers to stays: best (step 1) and last (step 4).
    assert load_checkpoint(tmp_path / "best.json").manifest["step"] == 1
    assert load_checkpoint(tmp_path).manifest["step"] == 4
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        ["best.json", "last.json"]
        + [f"ckpt-0000000{s}{x}" for s in (1, 4) for x in (".json", ".safetensors", ".state.pt")]
    )


def test_a_failed_save_removes_what_it_wrote(tmp_path, monkeypatch) -> None:
    from acmix.utils import io as uio

    real = uio.atomic_write_bytes
    written = []

    def full_disk(path, data):
        if str(path).endswith(".json"):
            raise OSError(28, f"cannot write {path}: No space left on device")
        written.append(path)
        return real(path, data)

    monkeypatch.setattr(ckpt, "atomic_write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 1, _weights(1.0), _state(1))
    assert len(written) == 2 and os.listdir(tmp_path) == []


def test_checkpoint_files_respect_the_umask(tmp_path) -> None:
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "a", 1, _weights(1.0), _state(1))
        os.umask(0o077)
        save_checkpoint(tmp_path / "b", 1, _weights(1.0), _state(1))
    finally:
        os.umask(old)
    for sub, mode in (("a", 0o644), ("b", 0o600)):
        for p in (tmp_path / sub).iterdir():
            assert p.stat().st_mode & 0o777 == mode, (p, oct(p.stat().st_mode))


def test_a_failed_write_names_the_file(tmp_path) -> None:
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'no' / 'f.bin'}"):
        atomic_write_bytes(tmp_path / "no" / "f.bin", b"x")


# -- self-describing files, the EMA file, one resolver, timm's .pth.tar ---------------------------


def _st_metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_every_weights_file_and_the_config_describe_the_model(tmp_path) -> None:
    path = save_checkpoint(
        tmp_path, 5, _weights(1.0), _state(5), ema=_weights(0.5), description=DESC
    )
    files = json.loads(path.read_text())["files"]
    assert sorted(files) == ["config", "ema", "state", "weights"]
    assert files["ema"]["file"] == "ckpt-00000005.ema.safetensors"
    assert files["config"]["file"] == "ckpt-00000005.config.json"
    for kind in ("weights", "ema"):
        meta = _st_metadata(tmp_path / files[kind]["file"])
        assert meta["weights"] == ("model" if kind == "weights" else kind)
        assert meta["architecture"] == "acmix_tiny" and meta["num_classes"] == "10"
        assert meta["in_chans"] == "1" and json.loads(meta["input_size"]) == [1, 28, 28]
        assert json.loads(meta["mean"]) == [0.286] and json.loads(meta["std"]) == [0.353]
        assert meta["crop_pct"] == "1.0" and meta["interpolation"] == "bilinear"
        assert json.loads(meta["model_args"])["stem_stride"] == 2 and meta["img_mode"] == "L"
        assert meta["format"] == "pt" and meta["step"] == "5"
        # Each file alone describes itself (and says which weights it holds).
        alone = load_checkpoint(tmp_path / files[kind]["file"])
        assert alone.description == DESC and alone.weights_are_ema == (kind == "ema")
    # timm's hub layout: only PretrainedCfg fields under pretrained_cfg; num_classes at the top.
    cfg = json.loads((tmp_path / files["config"]["file"]).read_text())
    assert cfg["architecture"] == "acmix_tiny" and cfg["num_classes"] == 10
    assert cfg["model_args"] == {**DESC.model_args, "in_chans": 1}
    assert cfg["label_names"] == list(DESC.label_names) and cfg["num_features"] == 32
    from timm.models import PretrainedCfg

    PretrainedCfg(**cfg["pretrained_cfg"])  # every key is one timm knows
    assert cfg["pretrained_cfg"]["input_size"] == [1, 28, 28]
    assert cfg["pretrained_cfg"]["crop_mode"] == "squash"
    ck = load_checkpoint(tmp_path, weights_only=True, ema=True)
    assert ck.description == DESC and ck.state is None
    for k, v in _weights(0.5).items():
        assert torch.equal(ck.ema[k], v)
    assert load_checkpoint(tmp_path, weights_only=True).ema is None  # read only when asked


def test_ema_of_older_checkpoints_comes_from_the_state(tmp_path) -> None:
    save_checkpoint(tmp_path, 1, _weights(1.0), {**_state(1), "ema": _weights(0.25)})
    ck = load_checkpoint(tmp_path, weights_only=True, ema=True)
    assert torch.equal(ck.ema["a.weight"], _weights(0.25)["a.weight"]) and ck.description is None
    assert _st_metadata(tmp_path / "ckpt-00000001.safetensors")["step"] == "1"


def test_pruning_and_cleaning_cover_the_ema_and_config_files(tmp_path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(
            tmp_path, step, _weights(step), _state(step), keep=1, ema=_weights(0), description=DESC
        )
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    suffixes = (".config.json", ".ema.safetensors", ".json", ".safetensors", ".state.pt")
    assert names == sorted(["last.json", *(f"ckpt-00000003{x}" for x in suffixes)])
    junk = [tmp_path / "ckpt-00000004.ema.safetensors", tmp_path / "ckpt-00000004.config.json"]
    for p in junk:
        p.write_bytes(b"{}")  # a crash after these, before their manifest
    assert sorted(ckpt.clean_checkpoint_dir(tmp_path)) == sorted(junk)


def test_one_resolver_for_every_kind_of_path(tmp_path) -> None:
    run = tmp_path / "run"
    d = run / "checkpoints"
    save_checkpoint(d, 2, _weights(1.0), _state(2), tags=("last", "best"), description=DESC)
    assert resolve_checkpoint(run) == d / "last.json"
    assert resolve_checkpoint(d) == d / "last.json"
    assert resolve_checkpoint(d / "best") == d / "best.json"  # a tag without .json
    assert resolve_checkpoint(d / "ckpt-00000002.config.json") == d / "ckpt-00000002.json"
    assert resolve_checkpoint(d / "ckpt-00000002.safetensors") == d / "ckpt-00000002.safetensors"
    with pytest.raises(CheckpointError, match=r"training state .* pass its manifest .*0002\.json"):
        resolve_checkpoint(d / "ckpt-00000002.state.pt")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointError, match=r"notes\.txt: not a checkpoint file type '\.txt'"):
        resolve_checkpoint(tmp_path / "notes.txt")
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope .*a run directory"):
        resolve_checkpoint(tmp_path / "nope")
    # A directory without last.json names what it holds.
    (d / "last.json").unlink()
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*ckpt-00000002\.json"):
        resolve_checkpoint(run)
    # A Hugging Face style folder: config.json + model.safetensors.
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes((d / "ckpt-00000002.safetensors").read_bytes())
    (hf / "config.json").write_bytes(DESC.to_config_bytes())
    assert resolve_checkpoint(hf) == hf / "model.safetensors"
    assert resolve_checkpoint(hf / "config.json") == hf / "model.safetensors"
    assert load_checkpoint(hf).description == DESC


def _timm_checkpoint(weights: dict, **args) -> dict:
    """What timm's train.py saves (CheckpointSaver._save), with a pickled argparse.Namespace."""
    import argparse

    return {
        "epoch": 3,
        "arch": args.get("model", "acmix_tiny"),
        "state_dict": {f"module.{k}": v for k, v in weights.items()},
        "state_dict_ema": dict(weights),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "version": 2,
        "args": argparse.Namespace(**args),
        "metric": 12.5,
        "saver": {"checkpoint_files": [("checkpoint-3.pth.tar", 12.5)], "pending": (3, 12.5)},
    }


def test_timm_pth_tar_is_read_safely_with_its_description(tmp_path) -> None:
    path = tmp_path / "model_best.pth.tar"
    args = dict(
        model="acmix_tiny",
        num_classes=None,  # from the classifier's shape
        in_chans=1,
        input_size=None,
        img_size=32,
        mean=[0.5],
        std=None,  # the architecture's default (ImageNet, averaged for one channel)
        crop_pct=None,
        interpolation="",
        model_kwargs={"stem_stride": 2},
    )
    weights = {"fc.weight": torch.zeros(7, 4), "fc.bias": torch.zeros(7)}
    torch.save(_timm_checkpoint(weights, **args), path)
    ck = load_checkpoint(path, ema=True)
    assert ck.kind == "timm" and ck.state is None and ck.manifest == {"epoch": 3}
    assert sorted(ck.weights) == ["fc.bias", "fc.weight"]  # module. stripped
    assert ck.ema is not None and sorted(ck.ema) == ["fc.bias", "fc.weight"]
    d = ck.description
    assert (d.architecture, d.num_classes, d.in_chans) == ("acmix_tiny", 7, 1)
    assert d.model_args == {"stem_stride": 2} and d.input_size == (1, 32, 32)
    assert d.mean == (0.5,) and d.std == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))
    assert d.crop_pct == 0.875 and d.interpolation == "bilinear"  # acmix_tiny's pretrained_cfg
    # 'arch' that timm does not know and no args: weights, but no description.
    raw = _timm_checkpoint(weights)
    del raw["args"]
    raw["arch"] = "acmixresnet"
    torch.save(raw, path)
    ck = load_checkpoint(path)
    assert ck.description is None and ck.arch_hint == "acmixresnet"


def test_pth_tar_with_other_objects_is_refused(tmp_path) -> None:
    import argparse

    path = tmp_path / "evil.pth.tar"
    raw = _timm_checkpoint({"w": torch.ones(1)}, model="acmix_tiny")
    raw["args"] = argparse.Namespace(model="acmix_tiny", payload=Evil())
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth\.tar.*not a readable checkpoint"):
        load_checkpoint(path)
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="holds a list, expected a state dict"):
        load_checkpoint(path)


def test_malformed_descriptions_are_named(tmp_path) -> None:
    bad = dict(DESC.to_metadata(), num_classes="ten")
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(_weights(1.0), str(path), metadata=bad)
    with pytest.raises(
        CheckpointError, match=r"w\.safetensors: safetensors metadata 'num_classes'"
    ):
        load_checkpoint(path)
    cfg = DESC.to_config()
    cfg["pretrained_cfg"]["mean"] = "0.5"
    with pytest.raises(CheckpointError, match="config.json: mean must be a list of numbers"):
        ModelDescription.from_config(cfg, "config.json")
    with pytest.raises(CheckpointError, match="no 'architecture'"):
        ModelDescription.from_config({"num_classes": 3}, "config.json")


def test_plain_torch_files_load_unwrapped(tmp_path) -> None:
    """What `inspect` reads without a run: a wrapped state dict, unwrapped; bad files named."""
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt.*not a readable checkpoint"):
        load_checkpoint(bad, weights_only=True)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.safetensors", weights_only=True)
    torch.save({"model": {"module.rate1": torch.ones(1)}}, tmp_path / "wrapped.pth")
    assert list(load_checkpoint(tmp_path / "wrapped.pth", weights_only=True).weights) == ["rate1"]
