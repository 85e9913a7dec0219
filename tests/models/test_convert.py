"""``convert_checkpoint`` / ``acmix convert``: round trip, safe loading, clear errors, atomic
writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from acmix.cli import main
from acmix.models import TEST_CONFIGS
from acmix.models.convert import CheckpointError, convert_checkpoint, find_filter_fn
from acmix.models.resnet import checkpoint_filter_fn
from tests.conftest import load_fixture, max_abs
from tests.fixtures_util import authors_resnet_checkpoint, regenerate_state_dict

TINY = dict(layers=(1, 1, 1, 1), widths=(8, 16, 32, 64), num_classes=10)


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model("acmix_resnet26", **TINY)
    # non-trivial BN statistics, so a lost buffer would show in the logits
    for name, buf in model.named_buffers():
        if name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
        elif name.endswith("running_mean"):
            buf.uniform_(-0.3, 0.3)
    return model.state_dict()


def _authors_pth(sd: dict[str, torch.Tensor], path: Path) -> Path:
    """The authors' training-checkpoint layout: DataParallel keys in {'state_dict': ...}."""
    torch.save(authors_resnet_checkpoint(sd), path)
    return path


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_filter_is_found_through_the_registering_module() -> None:
    assert find_filter_fn("acmix_resnet50") is checkpoint_filter_fn


def test_round_trip_same_logits(tiny_sd: dict, tmp_path: Path) -> None:
    src = _authors_pth(tiny_sd, tmp_path / "authors.pth")
    dst = tmp_path / "out" / "tiny.safetensors"
    written = convert_checkpoint(src, dst, "acmix_resnet26", **TINY)
    assert dst.is_file()
    assert [p.name for p in dst.parent.iterdir()] == ["tiny.safetensors"]  # no temp files left
    on_disk = load_file(str(dst))
    assert on_disk.keys() == tiny_sd.keys() == written.keys()
    assert all(torch.equal(on_disk[k], tiny_sd[k]) for k in tiny_sd)

    reference = timm.create_model("acmix_resnet26", **TINY)
    reference.load_state_dict(tiny_sd)
    loaded = timm.create_model(
        "acmix_resnet26", **TINY, pretrained=True, pretrained_cfg_overlay=dict(file=str(dst))
    )
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_logits(loaded, x), _logits(reference, x), rtol=0, atol=0)


def test_fixture07_through_cli(fixtures_dir: Path, tmp_path: Path) -> None:
    """The authors' tiny model (fixture 07): .pth -> `acmix convert` -> their logits."""
    fx = load_fixture(fixtures_dir, "07_acmix_resnet_tiny_model")
    src = _authors_pth(regenerate_state_dict(fx), tmp_path / "acmix_tiny.pth")
    dst = tmp_path / "acmix_tiny.safetensors"
    argv = ["convert", str(src), str(dst), "--model", "acmix_resnet26"]
    argv += ["--model-arg", "layers=(1,1,1,1)", "--model-arg", "num_classes=10"]
    assert main(argv) == 0
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = timm.create_model(
            "acmix_resnet26",
            layers=(1, 1, 1, 1),
            num_classes=10,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(dst)),
        )
    finally:
        torch.set_default_dtype(default)
    assert max_abs(_logits(model, fx["input"]), fx["output"]) <= 1e-8


def test_safetensors_source(tiny_sd: dict, tmp_path: Path) -> None:
    src = tmp_path / "plain.safetensors"
    save_file({f"module.{k}": v for k, v in tiny_sd.items()}, str(src))
    dst = tmp_path / "converted.safetensors"
    convert_checkpoint(src, dst, "acmix_resnet26", **TINY)
    assert load_file(str(dst)).keys() == tiny_sd.keys()


def _assert_fails_cleanly(
    src: Path, dst: Path, match: str, *, kwargs: dict | None = None, err=CheckpointError
) -> None:
    before = sorted(p.name for p in dst.parent.iterdir())
    with pytest.raises(err, match=match):
        convert_checkpoint(src, dst, "acmix_resnet26", **(TINY if kwargs is None else kwargs))
    assert sorted(p.name for p in dst.parent.iterdir()) == before  # nothing written, no temp file


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_a_clear_error(tiny_sd: dict, tmp_path: Path, suffix: str) -> None:
    full = tmp_path / f"full{suffix}"
    if suffix == ".pth":
        torch.save(tiny_sd, full)
    else:
        save_file(tiny_sd, str(full))
    data = full.read_bytes()
    src = tmp_path / f"truncated{suffix}"
    src.write_bytes(data[: len(data) // 2])
    _assert_fails_cleanly(
        src, tmp_path / "dst.safetensors", match=r"truncated\.\w+.*not a readable"
    )


def test_garbage_and_non_checkpoint_files(tmp_path: Path) -> None:
    dst = tmp_path / "dst.safetensors"
    garbage = tmp_path / "notes.pth"
    garbage.write_text("these are not weights\n")
    _assert_fails_cleanly(garbage, dst, match=r"notes\.pth.*not a readable checkpoint")
    a_list = tmp_path / "list.pt"
    torch.save([1, 2, 3], a_list)
    _assert_fails_cleanly(a_list, dst, match=r"list\.pt.*holds a list")
    no_tensors = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "arch": "resnet50"}, no_tensors)
    _assert_fails_cleanly(no_tensors, dst, match=r"meta\.pt.*not a state dict")
    _assert_fails_cleanly(tmp_path / "missing.pth", dst, match="missing", err=FileNotFoundError)


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    """weights_only loading: a pickle that would run code is an error, not executed."""
    src = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fn": Path("x")}}, src)
    _assert_fails_cleanly(src, tmp_path / "dst.safetensors", match=r"evil\.pth")


def test_wrong_shape_names_key_found_and_expected(tiny_sd: dict, tmp_path: Path) -> None:
    # a 1000-class checkpoint converted for the 10-class tiny model
    sd = dict(tiny_sd)
    sd["fc.weight"] = torch.zeros(1000, 256)
    sd["fc.bias"] = torch.zeros(1000)
    src = _authors_pth(sd, tmp_path / "wrong.pth")
    _assert_fails_cleanly(
        src, tmp_path / "dst.safetensors", match=r"fc\.weight.*\(1000, 256\).*\(10, 256\)"
    )
    # a checkpoint of another architecture (kernel_conv 5 layers)
    sd = dict(tiny_sd)
    sd["layer3.0.conv2.dep_conv.weight"] = torch.zeros(32, 25, 5, 5)
    src = _authors_pth(sd, tmp_path / "k5.pth")
    _assert_fails_cleanly(src, tmp_path / "dst.safetensors", match=r"layer3\.0\.conv2\.dep_conv")


def test_missing_and_unexpected_keys(tiny_sd: dict, tmp_path: Path) -> None:
    sd = {k: v for k, v in tiny_sd.items() if not k.startswith("layer4.0.bn3")}
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    src = _authors_pth(sd, tmp_path / "keys.pth")
    _assert_fails_cleanly(
        src, tmp_path / "dst.safetensors", match=r"(?s)missing keys.*layer4\.0\.bn3.*layer5"
    )


def test_failure_keeps_an_existing_destination(tiny_sd: dict, tmp_path: Path) -> None:
    dst = tmp_path / "dst.safetensors"
    dst.write_bytes(b"previous")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError):
        convert_checkpoint(bad, dst, "acmix_resnet26", **TINY)
    assert dst.read_bytes() == b"previous"


def test_interrupted_write_leaves_nothing(
    tiny_sd: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure between writing the temp file and the rename leaves neither file behind."""
    src = _authors_pth(tiny_sd, tmp_path / "a.pth")
    out = tmp_path / "out"
    out.mkdir()

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("acmix.models.convert.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint(src, out / "dst.safetensors", "acmix_resnet26", **TINY)
    assert list(out.iterdir()) == []


def test_unknown_model_and_cli_errors(
    tiny_sd: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = _authors_pth(tiny_sd, tmp_path / "a.pth")
    with pytest.raises(ValueError, match="unknown model 'acmix_resnet27'"):
        convert_checkpoint(src, tmp_path / "b.safetensors", "acmix_resnet27")
    garbage = tmp_path / "c.pth"
    garbage.write_text("nope")
    rc = main(
        ["convert", str(garbage), str(tmp_path / "d.safetensors"), "--model", "acmix_resnet26"]
    )
    assert rc == 1
    assert "c.pth" in capsys.readouterr().err
    assert not (tmp_path / "d.safetensors").exists()


@pytest.mark.parametrize("name", timm.list_models("acmix_*"))
def test_every_family_round_trips(name: str, tmp_path: Path) -> None:
    """Each family's own filter is found and used; the file loads back to the same logits."""
    cfg = TEST_CONFIGS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, **cfg.kwargs).eval()
    src = tmp_path / "ckpt.pth"
    torch.save(authors_resnet_checkpoint(model.state_dict()), src)
    dst = tmp_path / "ckpt.safetensors"
    convert_checkpoint(src, dst, name, **cfg.kwargs)
    overlay = dict(file=str(dst), num_classes=model.num_classes)
    loaded = timm.create_model(name, **cfg.kwargs, pretrained=True, pretrained_cfg_overlay=overlay)
    x = torch.randn(1, *cfg.input_size)
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)
