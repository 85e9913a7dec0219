"""Data sets: embedded Fashion-MNIST, scikit-learn's digits, ImageNet-style image folders.

* **Fashion-MNIST** (Zalando, MIT licence; 60,000 training and 10,000 test
  images, 28x28 grey, 10 classes) is read from the gzipped IDX files of the
  Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``) or any directory holding the same
  four files. Nothing is downloaded: when the files are missing the error
  says how to install them and offers ``--dataset digits``.
* **digits**: scikit-learn's bundled 1,797 8x8 handwritten digits, split
  80/20 with a fixed seed (stratified), for machines without the package.
* **Image folders**: ``root/<split>/<class>/<image>`` (ImageNet / torchvision
  ``ImageFolder`` layout), or ``root/<split>.tar`` (a tar of class folders),
  or ``root/<split>/<class>.tar``, through timm's dataset readers. A missing
  folder, a split without classes, an empty class or class sets that differ
  between splits raise :class:`DataError` naming the path. Unreadable
  images: see :class:`ImageFolder` (``bad_images``).
"""

from __future__ import annotations

import os
import tarfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import get_img_extensions
from timm.data.readers.reader import Reader
from timm.data.readers.reader_image_folder import find_images_and_targets
from timm.data.readers.reader_image_in_tar import ReaderImageInTar
from torch.utils.data import Dataset

from acmix.data.config import IMG_MODES
from acmix.data.idx import read_idx

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "IMAGE_EXTENSIONS",
    "INSTALL_FASHION_MNIST",
    "ArrayDataset",
    "DataError",
    "DatasetNotFoundError",
    "ImageFolder",
    "check_same_classes",
    "load_digits",
    "load_fashion_mnist",
]

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: The command that installs them.
INSTALL_FASHION_MNIST = "apt-get install -y dataset-fashion-mnist"
#: split -> (images file, labels file).
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: File suffixes taken as images in an image folder (lower case).
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".pgm",
    ".bmp",
    ".tif",
    ".tiff",
    ".webp",
)


class DataError(ValueError):
    """Bad or missing data; the message names the path."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A data set that is not on this machine; the message says how to get it."""


class ArrayDataset(Dataset):
    """Images held in memory as ``uint8`` (N, C, H, W) with integer labels.

    ``dataset[i]`` is ``(transform(PIL image), label)``; without a transform,
    ``(float tensor (C, H, W) in [0, 1], label)``.

    Args:
        images: ``(N, C, H, W)`` ``uint8`` tensor, C = 1 or 3.
        targets: ``(N,)`` integer labels in ``[0, len(classes))``.
        classes: class names.
        name: data-set name for messages.
        transform: ``PIL.Image -> tensor`` (see :mod:`acmix.data.transforms`).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        classes: Sequence[str],
        name: str,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be uint8 (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if targets.shape != (images.shape[0],):
            raise ValueError(
                f"targets must be ({images.shape[0]},), got {tuple(targets.shape)} "
                f"for {images.shape[0]} images"
            )
        if len(targets) and (targets.min() < 0 or targets.max() >= len(classes)):
            raise ValueError(f"labels must lie in [0, {len(classes)}), got {targets.unique()}")
        self.images = images
        self.targets = targets.long()
        self.classes = list(classes)
        self.name = name
        self.transform = transform

    @property
    def num_channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std of the pixels scaled to [0, 1] (for normalisation)."""
        x = self.images.double().div_(255).transpose(0, 1).reshape(self.num_channels, -1)
        return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())

    def subset(self, n: int, seed: int = 0) -> ArrayDataset:
        """A fixed random subset of ``n`` images (the same for the same seed)."""
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        return ArrayDataset(self.images[idx], self.targets[idx], self.classes, self.name)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def pil(self, index: int) -> Image.Image:
        """Image ``index`` as a PIL image (mode ``L`` or ``RGB``)."""
        arr = self.images[index].permute(1, 2, 0).numpy()
        return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if self.transform is None:
            return self.images[index].float().div(255), int(self.targets[index])
        return self.transform(self.pil(index)), int(self.targets[index])


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> ArrayDataset:
    """Fashion-MNIST from its IDX files.

    Args:
        root: directory with the four ``*-idx?-ubyte.gz`` files; default
            :data:`FASHION_MNIST_DIR` (the Debian package's).
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).

    Returns:
        An :class:`ArrayDataset` of ``(N, 1, 28, 28)`` images.

    Raises:
        DatasetNotFoundError: the files are missing (the message gives the install command).
        DataError: the files are malformed, or images and labels disagree.
    """
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be one of {list(FASHION_MNIST_FILES)}, got {split!r}")
    root = Path(root or FASHION_MNIST_DIR)
    img_name, lbl_name = FASHION_MNIST_FILES[split]
    missing = [root / n for n in (img_name, lbl_name) if not (root / n).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found: missing {', '.join(str(m) for m in missing)}.\n"
            f"Install it with:  {INSTALL_FASHION_MNIST}   (as root; Debian/Ubuntu)\n"
            "or use scikit-learn's bundled digits instead:  --dataset digits"
        )
    try:
        images = read_idx(root / img_name)
        labels = read_idx(root / lbl_name)
    except ValueError as e:
        raise DataError(str(e)) from None
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{root}: images {images.shape} and labels {labels.shape} do not match "
            "(expected (N, H, W) and (N,))"
        )
    if images.dtype != np.uint8 or labels.dtype != np.uint8 or labels.max(initial=0) > 9:
        raise DataError(f"{root}: expected uint8 images and labels 0-9")
    return ArrayDataset(
        torch.from_numpy(images).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        FASHION_MNIST_CLASSES,
        "fashion-mnist",
    )


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (no download), a fixed stratified split.

    Args:
        split: ``"train"`` or ``"test"``.
        test_fraction: share of each class in the test split.
        seed: seed of the split.

    Returns:
        An :class:`ArrayDataset` of ``(N, 1, 8, 8)`` images scaled to 0-255.

    Raises:
        DatasetNotFoundError: scikit-learn is not installed.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError:
        raise DatasetNotFoundError(
            "the digits data set needs scikit-learn: pip install scikit-learn"
        ) from None
    bunch = _sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16
    labels = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test[rng.permutation(idx)[: round(len(idx) * test_fraction)]] = True
    keep = test if split == "test" else ~test
    return ArrayDataset(
        torch.from_numpy(images[keep]).unsqueeze(1),
        torch.from_numpy(labels[keep]),
        [str(i) for i in range(10)],
        "digits",
    )


class _ClassFolderReader(Reader):
    """``root/<class>/**/<image>`` for timm's :class:`~timm.data.ImageDataset` interface.

    Each class folder is scanned by timm's ``find_images_and_targets``
    (recursive, following links, :data:`IMAGE_EXTENSIONS`), but the label is
    the *top* class folder (torchvision's rule, as before): timm's own
    :class:`ReaderImageFolder` labels by the leaf folder and would split or
    drop the images of a class folder's sub-folders. Paths are sorted as
    strings within a class (timm sorts "naturally"), so the sample order,
    and with it a seed's batches, is the one earlier runs had.
    """

    def __init__(self, root: Path, classes: Sequence[str]) -> None:
        super().__init__()
        self.root = root
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(classes):
            found, _ = find_images_and_targets(str(root / name), types=IMAGE_EXTENSIONS, sort=False)
            files = sorted(f for f, _ in found)
            if not files:
                raise DataError(
                    f"empty class folder: {root / name} has no image "
                    f"({', '.join(IMAGE_EXTENSIONS)})"
                )
            self.samples += [(f, label) for f in files]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, target = self.samples[index]
        return open(path, "rb"), target  # the caller closes it

    def __len__(self) -> int:
        return len(self.samples)

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        path = self.samples[index][0]
        if basename:
            return os.path.basename(path)
        return path if absolute else os.path.relpath(path, self.root)


def _tar_reader(root: Path) -> tuple[Reader, list[str], list[tuple[str, int, int]]]:
    """timm's :class:`ReaderImageInTar` over a ``.tar`` (or a folder of them), checked.

    Returns:
        The reader, its class names sorted as strings (the label order of
        folders), and the samples as ``(name for messages (archive:member),
        label, the reader's index)``, sorted by label, then name (timm sorts
        all members by path "naturally").

    Raises:
        DataError: an unreadable archive, no image in it, or images outside
            class folders (a single archive's top level).
    """
    try:
        reader = ReaderImageInTar(str(root), cache_tarinfo=False)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"unreadable tar file in {root}: {e}") from None
    except (ValueError, AssertionError):  # timm: no sample (unpacks an empty zip) / no .tar
        raise DataError(
            f"no image in {root} (tar members <class>/<image> with a suffix in "
            f"{', '.join(get_img_extensions())})"
        ) from None
    classes = sorted(reader.class_name_to_idx)
    if "" in classes:
        loose = [
            str(ti.name)
            for (ti, _, _), t in zip(reader.samples, reader.targets, strict=True)
            if reader.class_idx_to_name[int(t)] == ""
        ]
        raise DataError(
            f"images outside class folders in {root}: {', '.join(loose[:3])}"
            f"{' ...' if len(loose) > 3 else ''} (expected <class>/<image> members)"
        )
    ours = {name: i for i, name in enumerate(classes)}
    samples = []
    for pos, ((ti, parent, _child), t) in enumerate(
        zip(reader.samples, reader.targets, strict=True)
    ):
        archive = root / parent if parent else root
        samples.append((f"{archive}:{ti.name}", ours[reader.class_idx_to_name[int(t)]], pos))
    samples.sort(key=lambda s: (s[1], s[0]))  # by class, then name: a folder's order
    return reader, classes, samples


class ImageFolder(Dataset):
    """Class folders, a tar of them, or one tar per class, with checks that name the bad path.

    The samples come from timm's dataset readers (``timm.data.readers``):

    * a folder ``root/<class>/<image>`` (torchvision's / ImageNet's layout):
      class folders sorted by name (label = rank); files with a suffix in
      :data:`IMAGE_EXTENSIONS`, in sub-folders too, are the class's samples
      (:class:`_ClassFolderReader` over timm's folder scan);
    * ``root`` a ``.tar`` archive of ``<class>/<image>`` members, or a folder
      holding one ``<class>.tar`` per class (ImageNet's training tars):
      timm's :class:`ReaderImageInTar` (labels from the member's folder /
      the archive's name, timm's image suffixes; its tar-info cache is off,
      so nothing is written next to the data). Classes are again sorted by name.

    Images are converted to ``mode``: ``"RGB"`` (3 channels) or ``"L"`` (grayscale).

    Unreadable images (``bad_images``): ``"error"`` raises :class:`DataError`
    naming the file; ``"skip"`` (default) replaces it by the next readable
    sample, warns once naming the file, and counts it in ``self.skipped``.
    :meth:`verify` opens every file up front and drops the unreadable ones
    (again: counted and reported), so a run sees only good files. (timm's
    :class:`~timm.data.ImageDataset` only logs and retries; its policy is not
    used.)

    Args:
        root: the split folder (or ``.tar`` file).
        transform: ``PIL.Image -> tensor``.
        bad_images: ``"skip"`` or ``"error"``.
        classes: expected class names (another split's); ``None``: the
            classes found.
        classes_from: where ``classes`` came from (the other split's folder),
            named with this one when they differ.
        mode: the PIL mode images are converted to, ``"RGB"`` or ``"L"``.

    Raises:
        DataError: ``root`` is missing, neither a folder nor a tar file, has
            no class folders (nor tars), a class folder holds no image, or
            ``classes`` differ.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        bad_images: str = "skip",
        classes: Sequence[str] | None = None,
        classes_from: str = "the expected classes",
        mode: str = "RGB",
    ) -> None:
        if bad_images not in ("skip", "error"):
            raise ValueError(f"bad_images must be 'skip' or 'error', got {bad_images!r}")
        if mode not in IMG_MODES:
            raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
        self.mode = mode
        self.root = Path(root)
        self.transform = transform
        self.bad_images = bad_images
        self.skipped: list[str] = []
        self._pid = os.getpid()
        if not self.root.exists():
            raise DataError(f"image folder not found: {self.root}")
        tar = None
        if self.root.is_file():
            if not tarfile.is_tarfile(self.root):
                raise DataError(f"not a folder nor a tar file: {self.root}")
            tar = _tar_reader(self.root)
            found = tar[1]
        else:
            found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
            if not found and any(self.root.glob("*.tar")):
                tar = _tar_reader(self.root)
                found = tar[1]
            elif not found:
                raise DataError(
                    f"no class folders in {self.root} (expected {self.root}/<class>/*.jpg, "
                    f"or one {self.root}/<class>.tar per class)"
                )
        if classes is not None:
            check_same_classes(list(classes), found, classes_from, str(self.root))
        self.reader: Reader
        if tar is not None:
            self.reader, _, items = tar
            self.samples: list[tuple[str, int]] = [(name, label) for name, label, _ in items]
            self._pos = [pos for _, _, pos in items]  # sample i is the reader's item _pos[i]
        else:
            self.reader = _ClassFolderReader(self.root, found)
            self.samples = list(self.reader.samples)
            self._pos = list(range(len(self.samples)))
        self.classes = found
        self.targets = torch.tensor([t for _, t in self.samples], dtype=torch.long)

    @property
    def num_channels(self) -> int:
        """Channels of the images returned: 3 (``"RGB"``) or 1 (``"L"``)."""
        return 1 if self.mode == "L" else 3

    def __len__(self) -> int:
        return len(self.samples)

    def _forget_tar_handles(self) -> None:
        # timm's tar reader keeps its archives open; a forked worker must not share
        # the parent's file offsets, and a pickled (spawned) one cannot take them.
        states = getattr(self.reader, "tar_state", None)
        if states is None:
            return
        for st in states.values() if isinstance(states, dict) else [states]:
            st.reset()
            for child in st.children.values():
                child.reset()

    def __getstate__(self) -> dict[str, Any]:
        self._forget_tar_handles()
        return self.__dict__.copy()

    def _open(self, i: int) -> Image.Image:
        if os.getpid() != self._pid:
            self._forget_tar_handles()
            self._pid = os.getpid()
        f, _ = self.reader[self._pos[i]]
        with f, Image.open(f) as im:
            return im.convert(self.mode)

    def verify(self) -> list[str]:
        """Open every image once; drop (``"skip"``) or raise on (``"error"``) unreadable ones.

        Returns:
            The paths (``archive:member`` in a tar) dropped.
        """
        good, bad = [], []
        for i, (path, _) in enumerate(self.samples):
            try:
                self._open(i)
                good.append(i)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                if self.bad_images == "error":
                    raise DataError(f"unreadable image {path}: {e}") from None
                bad.append(path)
        if bad:
            self._pos = [self._pos[i] for i in good]
            self.samples = [self.samples[i] for i in good]
            self.targets = torch.tensor([t for _, t in self.samples], dtype=torch.long)
            self.skipped += bad
            shown = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "")
            warnings.warn(
                f"skipped {len(bad)} unreadable image(s) in {self.root}: {shown}", stacklevel=2
            )
        return bad

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for k in range(len(self.samples)):
            i = (index + k) % len(self.samples)
            path, label = self.samples[i]
            try:
                img = self._open(i)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                if self.bad_images == "error":
                    raise DataError(f"unreadable image {path}: {e}") from None
                if path not in self.skipped:
                    self.skipped.append(path)
                    warnings.warn(f"skipping unreadable image {path}: {e}", stacklevel=2)
                continue
            return (self.transform(img) if self.transform else img), label
        raise DataError(f"no readable image in {self.root}")


def check_same_classes(a: Sequence[str], b: Sequence[str], a_name: str, b_name: str) -> None:
    """Raise :class:`DataError` listing the classes only in ``a`` or only in ``b``."""
    if list(a) == list(b):
        return
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    raise DataError(
        f"class folders differ between {a_name} and {b_name}: "
        f"only in {a_name}: {only_a or '-'}; only in {b_name}: {only_b or '-'}"
    )
