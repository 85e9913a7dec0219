"""Data: embedded Fashion-MNIST (IDX reader), scikit-learn digits, image folders, transforms.

Nothing here downloads anything. :mod:`acmix.data.config` holds the data's
configuration sections (:class:`DataConfig`, :class:`AugConfig`); see
:mod:`acmix.data.datasets` for the sources and their error policy,
:mod:`acmix.data.transforms` for the per-recipe transforms (timm's data
utilities) and :mod:`acmix.data.loader` for deterministic, resumable,
shardable batches.
"""

from acmix.data.config import DATASETS, AugConfig, DataConfig
from acmix.data.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    IMAGE_EXTENSIONS,
    INSTALL_FASHION_MNIST,
    ArrayDataset,
    DataError,
    DatasetNotFoundError,
    ImageFolder,
    check_same_classes,
    load_digits,
    load_fashion_mnist,
)
from acmix.data.idx import IdxError, read_idx, write_idx
from acmix.data.loader import (
    DataBundle,
    EvalBatchSampler,
    SeededDataset,
    TrainBatchSampler,
    build_data,
    sample_seed,
)
from acmix.data.transforms import build_eval_transform, build_mixup, build_train_transform

__all__ = [
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "IMAGE_EXTENSIONS",
    "INSTALL_FASHION_MNIST",
    "ArrayDataset",
    "AugConfig",
    "DataBundle",
    "DataConfig",
    "DataError",
    "DatasetNotFoundError",
    "EvalBatchSampler",
    "IdxError",
    "ImageFolder",
    "SeededDataset",
    "TrainBatchSampler",
    "build_data",
    "build_eval_transform",
    "build_mixup",
    "build_train_transform",
    "check_same_classes",
    "load_digits",
    "load_fashion_mnist",
    "read_idx",
    "sample_seed",
    "write_idx",
]
