"""The training loop: bit-exact resume, run outputs, learning on real-format data, signals."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from acmix.engine import CheckpointError, load_checkpoint, load_config, train
from acmix.engine.metrics import read_csv
from tests.data_util import child_env, make_fake_fmnist, wait_for

REPO = Path(__file__).resolve().parents[2]

#: A tiny run with every source of randomness switched on: augmentation (crop, flip,
#: erasing), mixup, dropout, drop-path, BatchNorm, EMA, momentum, warm-up + cosine.
TINY = [
    "model.kwargs={stem_stride: 2, widths: [8, 16, 16, 32], depths: [1, 1, 1, 1]}",
    "model.drop_path_rate=0.1",
    "model.drop_rate=0.1",
    "data.batch_size=8",
    "data.eval_batch_size=16",
    "aug.crop_padding=2",
    "aug.re_prob=0.5",
    "aug.mixup=0.4",
    "aug.label_smoothing=0.1",
    "optim.lr=0.05",
    "sched.warmup_epochs=0.5",
    "train.ema_decay=0.9",
    "train.threads=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
]


def _cfg(data_dir: Path, out: Path, *extra: str):
    return load_config(None, [f"data.data_dir={data_dir}", f"train.output={out}", *TINY, *extra])


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> Path:
    return make_fake_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=48, n_test=20)


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_resume_is_bit_exact(fmnist_dir, tmp_path) -> None:
    """6 steps straight == 3 steps, stop, resume, 3 steps (mid-epoch: 6 steps per epoch)."""
    straight = train(_cfg(fmnist_dir, tmp_path / "a", "train.epochs=1"), log=lambda _: None)
    assert straight.step == 6 and straight.stopped is None

    first = train(
        _cfg(fmnist_dir, tmp_path / "b", "train.epochs=1", "train.stop_after_steps=3"),
        log=lambda _: None,
    )
    assert first.stopped == "stop_after_steps" and first.step == 3
    mid = load_checkpoint(tmp_path / "b" / "checkpoints")
    assert mid.state["step"] == 3 and mid.manifest["epoch"] == 0
    second = train(_cfg(fmnist_dir, tmp_path / "b", "train.epochs=1"), resume=str(tmp_path / "b"))
    assert second.step == 6 and second.stopped is None

    _assert_same_state(straight.model.state_dict(), second.model.state_dict())
    ck_a = load_checkpoint(tmp_path / "a" / "checkpoints", ema=True)
    ck_b = load_checkpoint(tmp_path / "b" / "checkpoints", ema=True)
    _assert_same_state(ck_a.ema, ck_b.ema)  # the EMA weights' own file
    a, b = ck_a.state, ck_b.state
    for (ka, va), (kb, vb) in zip(
        a["optimizer"]["state"].items(), b["optimizer"]["state"].items(), strict=True
    ):
        assert ka == kb and torch.equal(va["momentum_buffer"], vb["momentum_buffer"])
    assert straight.val == second.val
    # The resumed run rewrote no epoch row twice.
    assert [r["epoch"] for r in read_csv(tmp_path / "b" / "metrics.csv")] == ["1"]


def test_resume_auto_and_mismatched_schedule(fmnist_dir, tmp_path) -> None:
    out = tmp_path / "r"
    fresh = train(_cfg(fmnist_dir, out, "train.epochs=1", "train.stop_after_steps=2"), "auto")
    assert fresh.step == 2
    again = train(_cfg(fmnist_dir, out, "train.epochs=1", "train.stop_after_steps=2"), "auto")
    assert again.step == 4  # continued, two more steps
    with pytest.raises(CheckpointError, match="schedule"):
        train(_cfg(fmnist_dir, out, "train.epochs=2"), resume=str(out))
    with pytest.raises(CheckpointError, match="does not fit"):
        train(_cfg(fmnist_dir, out, "model.kwargs.widths=[8, 16, 16, 16]"), resume=str(out))


def test_run_outputs_and_learning(tmp_path) -> None:
    """Four epochs on the synthetic bars: well above chance; every output file is written."""
    pytest.importorskip("matplotlib")
    data_dir = make_fake_fmnist(tmp_path / "data", n_train=96, n_test=20)
    cfg = _cfg(
        data_dir,
        tmp_path / "run",
        "train.epochs=4",
        "data.batch_size=16",
        "aug.crop=none",  # a 2-pixel shift would move a bar onto the next class's row
        "aug.mixup=0.0",
        "aug.re_prob=0.0",
        "model.drop_path_rate=0.0",
        "optim.lr=0.1",
        "train.plots=true",
        "train.keep=1",
        "train.log_every=4",
    )
    res = train(cfg, log=lambda _: None)
    out = tmp_path / "run"
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["step"]) for r in rows] == [6, 12, 18, 24]
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert res.val["count"] == 20 and res.val["top1"] >= 50.0  # chance: 10%
    assert res.best_top1 == max(float(r["val_top1"]) for r in rows)
    steps = read_csv(out / "steps.csv")
    assert [int(r["step"]) for r in steps] == [4, 8, 12, 16, 20, 24]
    assert [float(r["epoch"]) for r in steps][:2] == [4 / 6, 8 / 6]
    assert float(steps[-1]["loss"]) < float(steps[0]["loss"])
    ab = read_csv(out / "alpha_beta.csv")
    assert {r["layer"] for r in ab} == {f"stages.{i}.0.mixer" for i in range(4)}
    at_init = [r for r in ab if r["step"] == "0"]
    assert len(at_init) == 4 and all(float(r["alpha"]) == float(r["beta"]) == 0.5 for r in at_init)
    assert sorted({int(r["step"]) for r in ab}) == [0, 4, 6, 8, 12, 16, 18, 20, 24]
    assert {p.name for p in res.plots} == {"curves.png", "alpha_beta.png"}
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in res.plots)
    assert (out / "config.yaml").is_file()
    best = load_checkpoint(out / "checkpoints" / "best.json")
    assert best.manifest["metrics"]["top1"] == res.best_top1
    assert best.manifest["model"]["in_chans"] == 1
    # keep=1: the newest step checkpoint plus the one "best" points at (if older).
    assert len(list((out / "checkpoints").glob("ckpt-*.json"))) <= 2


def test_bf16_autocast_on_cpu(fmnist_dir, tmp_path) -> None:
    res = train(_cfg(fmnist_dir, tmp_path / "bf", "train.epochs=1", "train.amp=bf16"), log=print)
    assert res.step == 6 and all(torch.isfinite(p).all() for p in res.model.parameters())
    assert next(res.model.parameters()).dtype == torch.float32  # autocast, not a cast


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(fmnist_dir, tmp_path, sig) -> None:
    out = tmp_path / "sig"
    cmd = [
        sys.executable,
        "-m",
        "acmix",
        "train",
        *TINY,
        f"data.data_dir={fmnist_dir}",
        f"train.output={out}",
        "train.epochs=50",
        "train.log_every=1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO
    )
    wait_for(proc, "step 2/6")
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr
    assert f"stopped ({sig.name})" in stdout and "--resume" in stdout
    ck = load_checkpoint(out / "checkpoints")
    assert 2 <= ck.state["step"] < 300
    # ... and the run resumes from it.
    res = train(load_config(out / "config.yaml", ["train.stop_after_steps=1"]), resume=str(out))
    assert res.step == ck.state["step"] + 1


def test_init_from_loads_weights_and_keeps_a_new_head(fmnist_dir, tmp_path) -> None:
    from acmix.engine.config import ModelConfig
    from acmix.engine.trainer import build_model

    res = train(_cfg(fmnist_dir, tmp_path / "src", "train.epochs=1"), log=lambda _: None)
    trained = res.model.state_dict()
    kwargs = {"stem_stride": 2, "widths": [8, 16, 16, 32], "depths": [1, 1, 1, 1]}
    cfg = ModelConfig(kwargs=kwargs, init_from=str(tmp_path / "src" / "checkpoints"))
    same = build_model(cfg, num_classes=10, in_chans=1).state_dict()
    _assert_same_state(same, trained)
    new_head = build_model(cfg, num_classes=4, in_chans=1).state_dict()
    assert new_head["fc.weight"].shape == (4, 32)
    assert all(torch.equal(new_head[k], trained[k]) for k in trained if not k.startswith("fc."))
