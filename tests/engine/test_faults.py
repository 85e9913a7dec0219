"""Faults a run must survive or refuse clearly: non-finite values, a second run, kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from acmix.cli import main
from acmix.engine import (
    LockError,
    NonFiniteError,
    load_checkpoint,
    load_config,
    train,
)
from acmix.engine import trainer as trainer_mod
from acmix.engine.metrics import read_csv
from tests.data_util import child_env, make_fake_fmnist, wait_for

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "model.kwargs={stem_stride: 2, widths: [8, 16, 16, 32], depths: [1, 1, 1, 1]}",
    "data.batch_size=8",
    "data.eval_batch_size=20",
    "aug.re_prob=0.5",
    "optim.lr=0.05",
    "train.threads=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
]


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> Path:
    return make_fake_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=48, n_test=20)


def _cfg(data_dir: Path, out: Path, *extra: str):
    return load_config(None, [f"data.data_dir={data_dir}", f"train.output={out}", *TINY, *extra])


def _train_argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    data = f"data.data_dir={data_dir}"
    return [sys.executable, "-m", "acmix", "train", *TINY, data, f"train.output={out}", *extra]


# -- non-finite values --------------------------------------------------------------------------


class _NaNAfter:
    """A criterion wrapper whose loss is NaN from its ``n``-th call on."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def wrap(self, criterion):
        def call(out, target):
            self.calls += 1
            loss = criterion(out, target)
            return loss * float("nan") if self.calls >= self.n else loss

        return call


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    fmnist_dir, tmp_path, monkeypatch, capsys
) -> None:
    nan = _NaNAfter(4)
    real_setup = trainer_mod._Trainer._setup

    def setup(self):
        real_setup(self)
        self.criterion = nan.wrap(self.criterion)

    monkeypatch.setattr(trainer_mod._Trainer, "_setup", setup)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteError, match=r"training loss is nan at step 4 \(epoch 1"):
        train(_cfg(fmnist_dir, out, "train.epochs=2", "train.save_every_steps=1"), log=print)
    ck = load_checkpoint(out / "checkpoints")
    assert ck.manifest["step"] == 3  # step 4 was never applied, nor saved
    assert all(torch.isfinite(v).all() for v in ck.weights.values() if v.is_floating_point())
    assert not (out / "checkpoints" / "best.json").exists()
    # The command line: one clear line, status 1, no traceback.
    nan.calls = 0
    argv = ["train", f"--data-dir={fmnist_dir}", "-o", str(tmp_path / "cli"), *TINY]
    assert main([*argv, "train.epochs=1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("acmix train: error: the training loss is nan at step 4")


def test_non_finite_weights_are_never_saved(fmnist_dir, tmp_path, monkeypatch) -> None:
    real_step = torch.optim.SGD.step
    steps = {"n": 0}

    def step(self, closure=None):
        real_step(self, closure)
        steps["n"] += 1
        if steps["n"] == 2:  # an update that overflows, with a finite loss before it
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    out = tmp_path / "inf"
    with pytest.raises(NonFiniteError, match=r"weights are not finite at step 2 \("):
        train(_cfg(fmnist_dir, out, "train.epochs=1", "train.save_every_steps=1"), log=print)
    assert load_checkpoint(out / "checkpoints").manifest["step"] == 1


def test_a_non_finite_evaluation_is_never_best(fmnist_dir, tmp_path, monkeypatch) -> None:
    real = trainer_mod.evaluate
    calls = {"n": 0}

    def evaluate(*args, **kwargs):
        calls["n"] += 1
        val = real(*args, **kwargs)
        if calls["n"] == 2:
            val.update(loss=float("nan"), top1=100.0)  # a NaN loss with a "perfect" top-1
        return val

    monkeypatch.setattr(trainer_mod, "evaluate", evaluate)
    out = tmp_path / "ev"
    res = train(_cfg(fmnist_dir, out, "train.epochs=2"), log=print)
    best = load_checkpoint(out / "checkpoints" / "best.json")
    assert best.manifest["step"] == 6 and res.best_top1 < 100.0


# -- gradient checkpointing (item 2): the same run, BatchNorm statistics updated once ----------


def test_grad_checkpointing_run_equals_the_plain_run(fmnist_dir, tmp_path) -> None:
    plain = train(_cfg(fmnist_dir, tmp_path / "p", "train.epochs=1"), log=lambda _: None)
    ckpt = train(
        _cfg(fmnist_dir, tmp_path / "c", "train.epochs=1", "model.grad_checkpointing=true"),
        log=lambda _: None,
    )
    a, b = plain.model.state_dict(), ckpt.model.state_dict()
    for k, v in a.items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == int(b[k]) == 6, k
        else:
            torch.testing.assert_close(b[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert ckpt.val["loss"] == pytest.approx(plain.val["loss"], rel=1e-5)


# -- the checkpoint a run reports is its last, with its final metrics (item 8) ------------------


def test_the_reported_checkpoint_is_last_with_the_final_metrics(fmnist_dir, tmp_path, capsys):
    out = tmp_path / "se"
    argv = ["train", f"--data-dir={fmnist_dir}", "-o", str(out), *TINY, "train.epochs=3"]
    assert main([*argv, "train.save_every_steps=4"]) == 0  # 6 steps per epoch
    printed = capsys.readouterr().out
    reported = Path(next(ln for ln in printed.splitlines() if ln.startswith("checkpoint: "))[12:])
    last = json.loads((out / "checkpoints" / "last.json").read_text())
    assert json.loads(reported.read_text()) == last
    assert last["step"] == 18 and last["metrics"]["count"] == 20
    rows = read_csv(out / "metrics.csv")
    assert float(rows[-1]["val_top1"]) == last["metrics"]["top1"]
    # No step was written twice (an epoch's end is saved once, with its metrics).
    assert not list((out / "checkpoints").glob("ckpt-*-1.json"))


# -- one run per directory ----------------------------------------------------------------------


def test_a_second_run_into_a_running_directory_fails_naming_the_holder(
    fmnist_dir, tmp_path
) -> None:
    out = tmp_path / "busy"
    cmd = _train_argv(fmnist_dir, out, "train.epochs=200", "train.log_every=1")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=REPO
    )
    try:
        wait_for(proc, "step 2/6")
        rows_before = (out / "steps.csv").read_text()
        with pytest.raises(LockError, match=rf"run directory {out} is in use.*PID {proc.pid} "):
            train(_cfg(fmnist_dir, out, "train.epochs=1"), log=print)
        assert (out / "steps.csv").read_text().startswith(rows_before)  # untouched by us
        # kill -9: the lock file stays behind with the dead PID; the next run takes it over.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert str(proc.pid) in (out / "run.lock").read_text()
    logs: list[str] = []
    res = train(
        _cfg(fmnist_dir, out, "train.epochs=200", "train.stop_after_steps=1"),
        resume="auto",
        log=logs.append,
    )
    assert res.stopped == "stop_after_steps"
    assert any("taking over the lock" in ln and f"PID {proc.pid}" in ln for ln in logs)
    assert not (out / "run.lock").exists()  # released at the end


_SAVER = """
import pathlib, sys, time, torch
from acmix.engine import save_checkpoint
directory, tag, barrier = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
(barrier / tag).touch()
while len(list(barrier.iterdir())) < 3:  # start together, so that the saves overlap
    time.sleep(0.01)
for step in range(1, 31):
    w = {"w": torch.full((64, 64), float(step)), "tag": torch.tensor(int(tag))}
    save_checkpoint(directory, step, w, {"step": step, "tag": tag}, keep=100)
"""


def test_processes_saving_into_one_directory_never_break_a_manifest(tmp_path) -> None:
    (tmp_path / "barrier").mkdir()
    ckdir = tmp_path / "ck"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(ckdir), str(i), str(tmp_path / "barrier")],
            env=child_env(),
        )
        for i in range(3)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    manifests = sorted(ckdir.glob("ckpt-*.json"))
    assert len(manifests) == 90  # every save kept its own files (names ckpt-N, ckpt-N-1, ...)
    for m in manifests:
        ck = load_checkpoint(m)
        assert ck.state["step"] == ck.manifest["step"]
        assert int(ck.weights["tag"]) == int(ck.state["tag"])
    assert not list(ckdir.glob(".*"))  # no temp files, no lock file


def test_a_lock_held_in_this_process_is_refused_too(tmp_path) -> None:
    from acmix.utils.io import exclusive_lock

    with (
        exclusive_lock(tmp_path / "l", what="x"),
        pytest.raises(LockError, match=f"PID {os.getpid()} on"),
        exclusive_lock(tmp_path / "l", what="x", timeout=0.2),
    ):
        pass
    with exclusive_lock(tmp_path / "l", what="x") as stale:
        assert stale is None


# -- kill -9 at random moments: last always loadable, the resumed chain bit-exact ---------------


@pytest.mark.slow
def test_kill_9_at_random_moments_never_breaks_last_and_resume_is_bit_exact(
    fmnist_dir, tmp_path
) -> None:
    extra = ["train.epochs=4", "train.save_every_steps=1", "train.log_every=1", "train.keep=1"]
    straight = train(_cfg(fmnist_dir, tmp_path / "straight", *extra), log=lambda _: None)
    assert straight.step == 24

    out = tmp_path / "killed"
    rng = random.Random(0)
    kills = mid_write = 0
    for _ in range(60):  # at most; stops after 24 kills
        cmd = _train_argv(fmnist_dir, out, *extra, "--resume", "auto")
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=child_env(),
            cwd=REPO,
        )
        try:
            # Training has started (checkpoints are being written every step) ...
            wait_for(proc, " step ")
            time.sleep(rng.uniform(0.0, 0.4))  # ... then a random moment
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            proc.kill()
            proc.communicate()
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        ckdir = out / "checkpoints"
        mid_write += bool(list(ckdir.glob(".*.tmp")))  # killed while writing a file
        if (ckdir / "last.json").exists():
            ck = load_checkpoint(ckdir)  # verifies every file; never raises
            assert ck.state["step"] == ck.manifest["step"]
        if kills >= 24 or (proc.returncode == 0):
            break
    assert kills >= 20
    print(f"{kills} kills, {mid_write} of them mid-write")
    done = subprocess.run(
        _train_argv(fmnist_dir, out, *extra, "--resume", "auto"),
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    final = load_checkpoint(out / "checkpoints")
    assert final.manifest["step"] == 24
    sd = straight.model.state_dict()
    assert final.weights.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(final.weights[k], v), f"{k} differs after the kill chain"
    assert not list((out / "checkpoints").glob(".*.tmp"))
    assert not (out / "run.lock").exists()
