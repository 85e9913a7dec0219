"""Image folders in tar files (timm's tar reader): the same samples, checks and bad-file policy."""

from __future__ import annotations

import io
import re
import tarfile
import warnings
from pathlib import Path

import pytest
import torch

from acmix.data import AugConfig, DataConfig, DataError, ImageFolder, build_data
from tests.data_util import make_image_folder


def _tar(src: Path, dest: Path) -> Path:
    """``dest`` (a .tar) holding ``src``'s class folders as ``<class>/<image>`` members."""
    with tarfile.open(dest, "w") as tf:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                tf.add(path, arcname=str(path.relative_to(src)))
    return dest


def _pixels(ds: ImageFolder) -> list[tuple[bytes, int]]:
    return [(img.tobytes(), label) for img, label in (ds[i] for i in range(len(ds)))]


def test_a_tar_of_class_folders_reads_as_the_folder(tmp_path) -> None:
    root = make_image_folder(tmp_path / "f", classes=("b_dog", "a_cat", "c10"), per_class=2)
    tar = _tar(root / "train", tmp_path / "train.tar")
    folder, packed = ImageFolder(root / "train"), ImageFolder(tar)
    assert packed.classes == folder.classes == ["a_cat", "b_dog", "c10"]
    assert packed.targets.tolist() == folder.targets.tolist() == [0, 0, 1, 1, 2, 2]
    assert _pixels(packed) == _pixels(folder)
    assert packed.samples[0][0] == f"{tar}:a_cat/0.png"  # messages name archive and member
    gray = ImageFolder(tar, mode="L")
    assert gray[0][0].mode == "L" and gray.num_channels == 1


def test_one_tar_per_class(tmp_path) -> None:
    root = make_image_folder(tmp_path / "f", per_class=2)
    split = tmp_path / "tars"
    split.mkdir()
    for name in ("cat", "dog"):
        with tarfile.open(split / f"{name}.tar", "w") as tf:
            for path in sorted((root / "train" / name).iterdir()):
                tf.add(path, arcname=path.name)
    ds = ImageFolder(split)
    assert ds.classes == ["cat", "dog"] and ds.targets.tolist() == [0, 0, 1, 1]
    assert _pixels(ds) == _pixels(ImageFolder(root / "train"))


def test_build_data_reads_split_tars_and_checks_their_classes(tmp_path) -> None:
    root = make_image_folder(tmp_path / "f", per_class=3, size=24)
    data_dir = tmp_path / "d"
    data_dir.mkdir()
    _tar(root / "train", data_dir / "train.tar")
    _tar(root / "val", data_dir / "val.tar")
    data = build_data(
        DataConfig(dataset="folder", data_dir=str(data_dir), img_size=16), AugConfig()
    )
    assert data.classes == ["cat", "dog"] and len(data.train) == 6
    assert data.val[5][0].shape == (3, 16, 16) and data.val[5][1] == 1
    other = make_image_folder(tmp_path / "o", classes=("cat", "eel"), splits=("val",))
    _tar(other / "val", data_dir / "val.tar")
    train_tar = re.escape(str(data_dir / "train.tar"))
    with pytest.raises(
        DataError, match=rf"between {train_tar} and .*only in {train_tar}: \['dog'\]"
    ):
        build_data(DataConfig(dataset="folder", data_dir=str(data_dir)), AugConfig())
    (data_dir / "val.tar").unlink()
    with pytest.raises(
        DataError, match=r"image folder not found: .*val \(nor a tar file .*val\.tar"
    ):
        build_data(DataConfig(dataset="folder", data_dir=str(data_dir)), AugConfig())


def test_tar_layout_errors_name_the_file(tmp_path) -> None:
    not_tar = tmp_path / "x.tar"
    not_tar.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DataError, match=f"not a folder nor a tar file: {not_tar}"):
        ImageFolder(not_tar)
    loose = make_image_folder(tmp_path / "l", per_class=1, splits=("train",))
    flat = tmp_path / "flat.tar"
    with tarfile.open(flat, "w") as tf:
        tf.add(loose / "train" / "cat" / "0.png", arcname="0.png")
    with pytest.raises(DataError, match=rf"images outside class folders in {flat}: 0\.png"):
        ImageFolder(flat)
    empty = tmp_path / "empty.tar"
    with tarfile.open(empty, "w") as tf:
        info = tarfile.TarInfo("cat/notes.txt")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(DataError, match=f"no image in {empty}"):
        ImageFolder(empty)


def test_unreadable_images_in_a_tar_follow_the_policy(tmp_path) -> None:
    root = make_image_folder(tmp_path / "f", per_class=3, splits=("train",))
    (root / "train" / "dog" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    tar = _tar(root / "train", tmp_path / "train.tar")
    bad = f"{tar}:dog/1.png"
    ds = ImageFolder(tar)
    with pytest.warns(UserWarning, match=re.escape(bad)):
        _, label = ds[4]  # the next readable sample stands in
    assert label == 1 and ds.skipped == [bad]
    with pytest.raises(DataError, match=f"unreadable image {re.escape(bad)}"):
        ImageFolder(tar, bad_images="error")[4]
    checked = ImageFolder(tar)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        assert checked.verify() == [bad]
    assert checked.targets.tolist() == [0, 0, 0, 1, 1] and len(checked) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [checked[i][1] for i in range(len(checked))] == [0, 0, 0, 1, 1]


def test_tar_samples_load_in_worker_processes(tmp_path) -> None:
    """Open archives are not shared with forked workers (each reopens its own)."""
    root = make_image_folder(tmp_path / "f", per_class=4, splits=("train",))
    ds = ImageFolder(_tar(root / "train", tmp_path / "train.tar"), transform=_to_tensor)
    ds[0]  # the archive is now open in this process
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    got = torch.cat([x for x, _ in loader])
    assert torch.equal(got, torch.stack([ds[i][0] for i in range(len(ds))]))


def _to_tensor(img) -> torch.Tensor:
    return torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
