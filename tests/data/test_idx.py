"""The IDX reader: hand-written bytes, round trips, every malformed case, the real files."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from acmix.data import FASHION_MNIST_DIR, FASHION_MNIST_FILES, IdxError, read_idx, write_idx


def test_reads_hand_written_bytes(tmp_path) -> None:
    # magic 00 00 08 (ubyte) 02 (2-D), sizes 2 and 3 big-endian, then 6 bytes.
    raw = bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 250, 251, 252])
    (tmp_path / "a").write_bytes(raw)
    arr = read_idx(tmp_path / "a")
    assert arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, [[1, 2, 3], [250, 251, 252]])


def test_reads_big_endian_int32_and_gzip_by_content(tmp_path) -> None:
    raw = bytes([0, 0, 0x0C, 1, 0, 0, 0, 2]) + struct.pack(">ii", -2, 70000)
    # A gzipped file without .gz in its name: detected from the gzip magic.
    (tmp_path / "labels").write_bytes(gzip.compress(raw))
    arr = read_idx(tmp_path / "labels")
    assert arr.dtype == np.int32 and arr.dtype.byteorder in ("=", "<", "|")
    np.testing.assert_array_equal(arr, [-2, 70000])


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("name", ["x.idx", "x.idx.gz"])
def test_round_trip(tmp_path, dtype: str, name: str) -> None:
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    write_idx(tmp_path / name, arr)
    assert (tmp_path / name).read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".gz") else b"\0\0")
    out = read_idx(tmp_path / name)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_write_rejects_unsupported_dtype(tmp_path) -> None:
    with pytest.raises(TypeError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"", "not an IDX file"),
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "unknown IDX element type 0x07"),
        (b"\x00\x00\x08\x02\x00\x00\x00\x01", "truncated header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x04\x01\x02", "truncated: shape \\(4,\\)"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x01\x01\x02", "trailing bytes"),
    ],
)
def test_malformed_files_name_the_path(tmp_path, raw: bytes, match: str) -> None:
    path = tmp_path / "bad-file"
    path.write_bytes(raw)
    with pytest.raises(IdxError, match=match) as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_corrupt_gzip(tmp_path) -> None:
    good = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 100]) + bytes(100))
    path = tmp_path / "t.gz"
    path.write_bytes(good[: len(good) // 2])  # truncated gzip stream
    with pytest.raises(IdxError, match="corrupt or truncated gzip") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        read_idx(tmp_path / "nope.gz")


@pytest.mark.skipif(
    not (__import__("pathlib").Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_files() -> None:
    """The published facts: 60k / 10k images of 28x28, exactly 6000 / 1000 per class."""
    from pathlib import Path

    root = Path(FASHION_MNIST_DIR)
    for split, n in (("train", 60000), ("test", 10000)):
        img_name, lbl_name = FASHION_MNIST_FILES[split]
        labels = read_idx(root / lbl_name)
        assert labels.shape == (n,) and labels.dtype == np.uint8
        np.testing.assert_array_equal(np.bincount(labels), [n // 10] * 10)
    images = read_idx(root / FASHION_MNIST_FILES["test"][0])
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0
