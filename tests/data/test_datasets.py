"""Data sets: Fashion-MNIST from IDX files, the digits fallback, image folders and their errors."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

from acmix.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    INSTALL_FASHION_MNIST,
    ArrayDataset,
    DataError,
    DatasetNotFoundError,
    ImageFolder,
    load_digits,
    load_fashion_mnist,
    write_idx,
)
from tests.data_util import make_fake_fmnist, make_image_folder


def test_fashion_mnist_from_idx_files(tmp_path) -> None:
    root = make_fake_fmnist(tmp_path, n_train=30, n_test=20)
    train = load_fashion_mnist(root, "train")
    test = load_fashion_mnist(root, "test")
    assert len(train) == 30 and len(test) == 20
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.classes == list(FASHION_MNIST_CLASSES) and len(train.classes) == 10
    x, y = train[3]
    assert x.shape == (1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert y == int(train.targets[3])
    # Mean / std of the pixels, against numpy.
    pixels = train.images.numpy().astype(np.float64) / 255
    (m,), (s,) = train.mean_std()
    assert m == pytest.approx(pixels.mean(), rel=1e-12)
    assert s == pytest.approx(pixels.std(ddof=1), rel=1e-12)


def test_fashion_mnist_missing_names_the_fix(tmp_path) -> None:
    with pytest.raises(DatasetNotFoundError) as e:
        load_fashion_mnist(tmp_path, "train")
    msg = str(e.value)
    assert INSTALL_FASHION_MNIST in msg
    assert "--dataset digits" in msg
    assert str(tmp_path / FASHION_MNIST_FILES["train"][0]) in msg
    assert isinstance(e.value, FileNotFoundError)


def test_fashion_mnist_images_and_labels_must_agree(tmp_path) -> None:
    root = make_fake_fmnist(tmp_path, n_train=30, n_test=20)
    write_idx(root / FASHION_MNIST_FILES["train"][1], np.zeros(29, dtype=np.uint8))
    with pytest.raises(DataError, match="do not match"):
        load_fashion_mnist(root, "train")


def test_fashion_mnist_corrupt_file_is_named(tmp_path) -> None:
    root = make_fake_fmnist(tmp_path, n_train=30, n_test=20)
    path = root / FASHION_MNIST_FILES["test"][0]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match=str(path)):
        load_fashion_mnist(root, "test")


def test_subset_is_fixed_and_distinct() -> None:
    ds = ArrayDataset(
        torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1),
        torch.arange(50) % 10,
        list("abcdefghij"),
        "t",
    )
    a, b = ds.subset(20, seed=0), ds.subset(20, seed=0)
    assert torch.equal(a.images, b.images) and len(a) == 20
    assert len(set(a.images.flatten().tolist())) == 20
    assert not torch.equal(a.images, ds.subset(20, seed=1).images)


def test_array_dataset_checks() -> None:
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2), ["a"], "t")
    with pytest.raises(ValueError, match="labels must lie in"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 3]), ["a"], "t")


def test_digits_fallback() -> None:
    pytest.importorskip("sklearn")
    train, test = load_digits("train"), load_digits("test")
    assert len(train) + len(test) == 1797  # scikit-learn's bundled digits
    assert train.images.shape[1:] == (1, 8, 8) and train.images.max() == 255
    # Stratified 80/20: every class ~20% in test, disjoint and fixed.
    counts = torch.bincount(test.targets, minlength=10)
    total = counts + torch.bincount(train.targets, minlength=10)
    assert torch.all((counts.float() / total - 0.2).abs() < 0.01)
    assert torch.equal(load_digits("test").images, test.images)


def test_image_folder_reads_classes_in_order(tmp_path) -> None:
    root = make_image_folder(tmp_path, classes=("b_dog", "a_cat"), per_class=2)
    ds = ImageFolder(root / "train")
    assert ds.classes == ["a_cat", "b_dog"]
    assert [t for _, t in ds.samples] == [0, 0, 1, 1]
    img, label = ds[2]
    assert img.mode == "RGB" and img.size == (20, 20) and label == 1


def test_image_folder_errors_name_the_path(tmp_path) -> None:
    with pytest.raises(DataError, match=f"image folder not found: {tmp_path / 'nope'}"):
        ImageFolder(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match="no class folders in"):
        ImageFolder(tmp_path / "flat")
    root = make_image_folder(tmp_path / "r", per_class=1)
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=f"empty class folder: {root / 'train' / 'empty'}"):
        ImageFolder(root / "train")


def test_mismatched_class_sets(tmp_path) -> None:
    root = make_image_folder(tmp_path, classes=("cat", "dog"), per_class=1, splits=("train",))
    make_image_folder(tmp_path, classes=("cat", "eel"), per_class=1, splits=("val",))
    train = ImageFolder(root / "train")
    with pytest.raises(DataError, match=r"expected classes: \['dog'\]; only in .*: \['eel'\]"):
        ImageFolder(root / "val", classes=train.classes)
    # Through the recipe: the message names both folders.
    from acmix.data import AugConfig, DataConfig, build_data

    cfg = DataConfig(dataset="folder", data_dir=str(root))
    train_dir, val_dir = re.escape(str(root / "train")), re.escape(str(root / "val"))
    with pytest.raises(DataError, match=rf"between {train_dir} and {val_dir}: only in {train_dir}"):
        build_data(cfg, AugConfig(), {})


def test_corrupt_image_skip_policy(tmp_path) -> None:
    root = make_image_folder(tmp_path, per_class=2)
    bad = root / "train" / "cat" / "0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    ds = ImageFolder(root / "train", bad_images="skip")
    with pytest.warns(UserWarning, match=str(bad)):
        img, label = ds[0]  # the next readable sample stands in
    assert label == 0 and img.size == (20, 20)
    assert ds.skipped == [str(bad)]
    strict = ImageFolder(root / "train", bad_images="error")
    with pytest.raises(DataError, match=f"unreadable image {bad}"):
        strict[0]


def test_verify_drops_and_counts_unreadable_images(tmp_path) -> None:
    root = make_image_folder(tmp_path, per_class=3)
    bad = root / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    ds = ImageFolder(root / "train")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        dropped = ds.verify()
    assert dropped == [str(bad)] and len(ds) == 5
    assert ds.targets.tolist() == [0, 0, 0, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [ds[i][1] for i in range(len(ds))] == [0, 0, 0, 1, 1]
    with pytest.raises(DataError, match=str(bad)):
        ImageFolder(root / "train", bad_images="error").verify()
