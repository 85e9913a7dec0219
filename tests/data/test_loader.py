"""Batches: shards == the one-process global batch, mid-epoch resume, seeded augmentation."""

from __future__ import annotations

import pytest
import torch

from acmix.data import (
    DataError,
    EvalBatchSampler,
    SeededDataset,
    TrainBatchSampler,
    build_data,
    build_mixup,
    sample_seed,
)
from acmix.engine.config import AugConfig, ConfigError, DataConfig, load_config
from tests.data_util import make_fake_fmnist, make_image_folder


def _batches(sampler: TrainBatchSampler, epoch: int, start: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, start)
    return [[i for _, i in b] for b in sampler]


def test_ranks_partition_the_global_batch() -> None:
    one = TrainBatchSampler(50, 12, seed=3)
    ranks = [TrainBatchSampler(50, 12, rank=r, world_size=3, seed=3) for r in range(3)]
    for epoch in (0, 1):
        full = _batches(one, epoch)
        parts = [_batches(s, epoch) for s in ranks]
        assert len(full) == 50 // 12 == 4  # the incomplete last batch is dropped
        for step, batch in enumerate(full):
            assert len(batch) == 12
            joined = [i for p in parts for i in p[step]]
            assert joined == batch  # rank r: the r-th third, in order
    # Every index at most once per epoch; epochs differ; the same seed gives the same order.
    flat = [i for b in _batches(one, 0) for i in b]
    assert len(set(flat)) == len(flat) == 48
    assert _batches(one, 0) != _batches(one, 1)
    assert _batches(TrainBatchSampler(50, 12, seed=3), 1) == _batches(one, 1)


def test_resume_mid_epoch_continues_the_same_order() -> None:
    s = TrainBatchSampler(40, 8, seed=0)
    full = _batches(s, 2)
    assert _batches(s, 2, start=3) == full[3:]
    assert len(s) == 2


def test_sampler_errors() -> None:
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        TrainBatchSampler(40, 8, world_size=3)
    with pytest.raises(DataError, match="fewer than one batch"):
        TrainBatchSampler(5, 8)


def test_eval_shards_cover_every_sample_once() -> None:
    shards = [list(EvalBatchSampler(23, 8, rank=r, world_size=2)) for r in range(2)]
    seen = sorted(i for shard in shards for batch in shard for _, i in batch)
    assert seen == list(range(23))
    assert all(len(b) <= 4 for shard in shards for b in shard)


def test_sample_seed_mixes_its_inputs() -> None:
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450
    assert all(0 <= x < 2**63 for x in seeds)


def test_augmentation_is_a_function_of_seed_epoch_index(tmp_path) -> None:
    data = build_data(
        DataConfig(data_dir=str(make_fake_fmnist(tmp_path))),
        AugConfig(crop="pad", crop_padding=4, hflip=0.5, re_prob=0.5),
    )
    ds = SeededDataset(data.train, seed=7)
    a = ds[(1, 5)][0]
    torch.manual_seed(123)  # global state does not matter
    ds[(1, 6)]
    assert torch.equal(ds[(1, 5)][0], a)
    # Another epoch gives another augmentation of the same image (with overwhelming odds).
    assert not all(torch.equal(ds[(e, 5)][0], a) for e in range(2, 6))


def test_build_data_fashion_mnist(tmp_path) -> None:
    root = make_fake_fmnist(tmp_path, n_train=60, n_test=30)
    data = build_data(
        DataConfig(data_dir=str(root), train_subset=40, img_size=32), AugConfig(crop="none")
    )
    assert (data.num_classes, data.in_chans, data.img_size) == (10, 1, 32)
    assert len(data.train) == 40 and len(data.val) == 30
    x, y = data.val[0]
    assert x.shape == (1, 32, 32)
    assert data.info["classes"][9] == "Ankle boot" and data.info["center_crop"] is False
    # At the native size and without augmentation the training images are normalised
    # with their own statistics: mean 0, std 1.
    plain = build_data(
        DataConfig(data_dir=str(root), train_subset=40), AugConfig(crop="none", hflip=0)
    )
    xs = torch.stack([plain.train[i][0] for i in range(len(plain.train))]).double()
    assert abs(xs.mean().item()) < 1e-6 and abs(xs.std().item() - 1) < 1e-6


def test_build_data_image_folder(tmp_path) -> None:
    root = make_image_folder(tmp_path, per_class=3, size=40)
    data = build_data(
        DataConfig(dataset="folder", data_dir=str(root), img_size=32),
        AugConfig(crop="rrc", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25),
    )
    assert data.classes == ["cat", "dog"] and data.in_chans == 3
    x, y = data.train[4]
    assert x.shape == (3, 32, 32) and y == 1
    assert data.val[0][0].shape == (3, 32, 32)


def test_build_data_folder_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="needs data.data_dir"):
        build_data(DataConfig(dataset="folder"), AugConfig())
    with pytest.raises(DataError, match="image-folder root not found"):
        build_data(DataConfig(dataset="folder", data_dir=str(tmp_path / "x")), AugConfig())
    root = make_image_folder(tmp_path / "r", splits=("train",))
    with pytest.raises(DataError, match=f"image folder not found: {root / 'val'}"):
        build_data(DataConfig(dataset="folder", data_dir=str(root)), AugConfig())


def test_mixup_gives_soft_targets_that_sum_to_one() -> None:
    assert build_mixup(AugConfig(), 10) is None
    mix = build_mixup(AugConfig(mixup=0.8, cutmix=1.0, label_smoothing=0.1), 10)
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    xm, ym = mix(x.clone(), y)
    assert xm.shape == x.shape and ym.shape == (4, 10)
    torch.testing.assert_close(ym.sum(1), torch.ones(4))
    assert ym.min() >= 0.1 / 10 - 1e-6  # label smoothing floor


def test_worker_processes_give_the_same_batches(tmp_path) -> None:
    data = build_data(
        DataConfig(data_dir=str(make_fake_fmnist(tmp_path, n_train=32, n_test=8))),
        AugConfig(crop="pad", hflip=0.5, re_prob=0.5),
    )
    batches = []
    for workers in (0, 2):
        sampler = TrainBatchSampler(len(data.train), 8, seed=5)
        sampler.set_epoch(3)
        batches.append([(x.clone(), y.clone()) for x, y in data.train_loader(sampler, workers, 5)])
    assert len(batches[0]) == len(batches[1]) == 4
    for (x0, y0), (x1, y1) in zip(*batches, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_pin_memory_and_persistent_workers_defaults(tmp_path) -> None:
    root = make_fake_fmnist(tmp_path, n_train=16, n_test=8)
    data = build_data(DataConfig(data_dir=str(root)), AugConfig())
    cuda = torch.cuda.is_available()
    assert data.loader_options(0, "cpu") == (False, False)  # no workers: nothing to keep
    assert data.loader_options(2, torch.device("cpu")) == (False, True)
    assert data.loader_options(2, "cuda") == (cuda, True)  # pinned for CUDA (when there is one)
    off = build_data(
        DataConfig(data_dir=str(root), pin_memory=True, persistent_workers=False), AugConfig()
    )
    assert off.loader_options(2, "cpu") == (cuda, False)
    with pytest.raises(ConfigError, match=r"data\.persistent_workers=true needs loader workers"):
        DataConfig(workers=0, persistent_workers=True)
    with pytest.raises(ConfigError, match=r"data\.pin_memory: expected bool \| None, got .maybe."):
        load_config(None, ["data.pin_memory=maybe"])


def test_persistent_workers_keep_one_loader_with_the_same_batches(tmp_path) -> None:
    data = build_data(
        DataConfig(data_dir=str(make_fake_fmnist(tmp_path, n_train=32, n_test=8))),
        AugConfig(crop="pad", hflip=0.5),
    )
    sampler = TrainBatchSampler(len(data.train), 8, seed=5)
    plain = TrainBatchSampler(len(data.train), 8, seed=5)
    loader = data.train_loader(sampler, 2, 5)
    assert loader.persistent_workers and loader.num_workers == 2 and not loader.pin_memory
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        plain.set_epoch(epoch)
        again = data.train_loader(sampler, 2, 5)
        assert again is loader  # its workers are still the same processes
        got = [(x.clone(), y.clone()) for x, y in again]
        want = list(data.train_loader(plain, 0, 5))
        assert len(got) == len(want) == 4
        for (x0, y0), (x1, y1) in zip(got, want, strict=True):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert data.train_loader(TrainBatchSampler(32, 8, seed=5), 2, 5) is not loader
    assert data.val_loader(4, 0, 1, 2) is data.val_loader(4, 0, 1, 2)
