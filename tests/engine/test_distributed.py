"""DDP on CPU (gloo, loopback only): 2 processes == 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from acmix.engine import load_checkpoint, load_config, train
from acmix.engine.config import ConfigError
from acmix.engine.distributed import _group_generation
from tests.data_util import make_fake_fmnist

REPO = Path(__file__).resolve().parents[2]

#: No BatchNorm (GroupNorm), no dropout / drop-path / mixup: then the only difference
#: between W processes and one is the order of float additions in the gradient mean.
#: (Random erasing is left out too: its noise patches make this tiny net's 12 steps so
#: sensitive that float round-off grows to ~1e-3; the augmentation itself is the same
#: in any process, see tests/data/test_loader.py.)
DDP_RUN = [
    "model.kwargs={stem_stride: 2, widths: [8, 16, 16, 32], depths: [1, 1, 1, 1], norm: group}",
    "data.batch_size=8",
    "data.eval_batch_size=8",
    "aug.crop_padding=2",
    "optim.lr=0.05",
    "sched.warmup_epochs=0.5",
    "train.epochs=2",
    "train.ema_decay=0.9",
    "train.threads=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.plots=false",
]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loopback_env(port: int) -> dict[str, str]:
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"  # gloo binds to loopback, not the host's address
    return env


def _worker(rank: int, world: int, port: int, overrides: list[str], result_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), **_loopback_env(port)
    )
    res = train(load_config(None, overrides), log=lambda _: None)
    save_file(
        {k: v.contiguous() for k, v in res.model.state_dict().items()},
        os.path.join(result_dir, f"rank{rank}.safetensors"),
    )
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"val": res.val, "in_sync": res.ranks_in_sync, "step": res.step}, f)


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory) -> Path:
    return make_fake_fmnist(tmp_path_factory.mktemp("fmnist"), n_train=48, n_test=21)


@pytest.mark.slow  # spawns 2+ processes: 15-30 s here
def test_two_processes_match_one(fmnist_dir, tmp_path) -> None:
    base = [*DDP_RUN, f"data.data_dir={fmnist_dir}"]
    single = train(load_config(None, [*base, f"train.output={tmp_path / 'one'}"]), log=print)

    results = tmp_path / "results"
    results.mkdir()
    overrides = [*base, f"train.output={tmp_path / 'two'}"]
    mp.spawn(_worker, args=(2, _free_port(), overrides, str(results)), nprocs=2, join=True)

    w0 = load_file(str(results / "rank0.safetensors"))
    w1 = load_file(str(results / "rank1.safetensors"))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks differ in {k}"
    info = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    assert info[0]["in_sync"] is True and info[1]["in_sync"] is True
    assert info[0]["step"] == single.step == 12

    ref = single.model.state_dict()
    assert w0.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(
            w0[k], ref[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}"
        )
    # Metrics are reduced over the ranks' shards: the whole test set, once.
    assert info[0]["val"]["count"] == info[1]["val"]["count"] == 21
    assert info[0]["val"]["loss"] == pytest.approx(single.val["loss"], rel=1e-4)
    # Rank 0 alone writes checkpoints and logs.
    ck = load_checkpoint(tmp_path / "two" / "checkpoints")
    assert ck.state["world_size"] == 2 and ck.state["step"] == 12
    torch.testing.assert_close(ck.weights["fc.weight"], ref["fc.weight"], rtol=1e-4, atol=1e-5)


#: The BatchNorm variant of DDP_RUN's model.
BN_MODEL = (
    "model.kwargs={stem_stride: 2, widths: [8, 16, 16, 32], depths: [1, 1, 1, 1], norm: batch}"
)
DIST_BN = ("none", "reduce", "broadcast")


def _bn_worker(rank: int, world: int, ports: list[int], base: list[str], result_dir: str) -> None:
    """One rank: the same BN run once per ``train.dist_bn`` mode (one fresh group each)."""
    for mode, port in zip(DIST_BN, ports, strict=True):
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), **_loopback_env(port)
        )
        overrides = [*base, f"train.dist_bn={mode}", f"train.output={result_dir}/{mode}"]
        res = train(load_config(None, overrides), log=lambda _: None)
        save_file(
            {k: v.contiguous() for k, v in res.model.state_dict().items()},
            os.path.join(result_dir, f"{mode}-rank{rank}.safetensors"),
        )
        with open(os.path.join(result_dir, f"{mode}-rank{rank}.json"), "w") as f:
            json.dump({"in_sync": res.ranks_in_sync, "val": res.val}, f)


def test_dist_bn_is_validated() -> None:
    assert load_config(None, []).train.dist_bn == "reduce"
    msg = r"train\.dist_bn must be one of \['reduce', 'broadcast', 'none'\], got 'mean'"
    with pytest.raises(ConfigError, match=msg):
        load_config(None, ["train.dist_bn=mean"])


@pytest.mark.slow  # spawns 2+ processes: 15-30 s here
def test_batchnorm_ranks_in_sync(fmnist_dir, tmp_path) -> None:
    """BatchNorm on CPU (no SyncBatchNorm there): train.dist_bn makes the running statistics
    equal on the ranks, their mean (``reduce``, the default) or rank 0's (``broadcast``),
    without changing the training; ``none`` leaves each rank its own and the check says so.
    """
    base = [*DDP_RUN, BN_MODEL, f"data.data_dir={fmnist_dir}"]
    results = tmp_path / "results"
    results.mkdir()
    ports = [_free_port() for _ in DIST_BN]
    mp.spawn(_bn_worker, args=(2, ports, base, str(results)), nprocs=2, join=True)

    w = {
        m: [load_file(str(results / f"{m}-rank{r}.safetensors")) for r in range(2)] for m in DIST_BN
    }
    info = {
        m: [json.loads((results / f"{m}-rank{r}.json").read_text()) for r in range(2)]
        for m in DIST_BN
    }
    stats = [k for k in w["none"][0] if k.endswith((".running_mean", ".running_var"))]
    assert len(stats) >= 20
    # Without synchronisation the ranks' statistics differ (each saw its half of the batch).
    assert info["none"][0]["in_sync"] is False
    assert any(not torch.equal(w["none"][0][k], w["none"][1][k]) for k in stats)
    for mode in ("reduce", "broadcast"):
        assert info[mode][0]["in_sync"] is True and info[mode][1]["in_sync"] is True
        for k in w[mode][0]:
            assert torch.equal(w[mode][0][k], w[mode][1][k]), f"{mode}: ranks differ in {k}"
            if k not in stats:  # the training is the same: weights, num_batches_tracked
                assert torch.equal(w[mode][0][k], w["none"][0][k]), f"{mode} changed {k}"
    for k in stats:
        # The update rule is linear: the mean of the ranks' statistics, whenever averaged.
        mean = (w["none"][0][k].double() + w["none"][1][k].double()) / 2
        torch.testing.assert_close(
            w["reduce"][0][k].double(), mean, rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}"
        )
        # Rank 0's own statistics, bit for bit.
        assert torch.equal(w["broadcast"][0][k], w["none"][0][k]), k
    # Rank 0 writes the checkpoint: the synchronised statistics.
    ck = load_checkpoint(results / "reduce" / "checkpoints")
    for k in stats:
        assert torch.equal(ck.weights[k], w["reduce"][0][k]), k


@pytest.mark.slow  # spawns 2+ processes: 15-30 s here
def test_torchrun_cli(fmnist_dir, tmp_path) -> None:
    """`torchrun --nproc-per-node 2 -m acmix train ...` (static rendezvous on 127.0.0.1)."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(port),
        "-m",
        "acmix",
        "train",
        *DDP_RUN,
        "train.epochs=1",
        f"data.data_dir={fmnist_dir}",
        f"train.output={tmp_path / 'tr'}",
    ]
    env = {**os.environ, **_loopback_env(port), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DDP: weights identical on all 2 ranks" in proc.stdout
    assert "2 process(es)" in proc.stdout
    ck = load_checkpoint(tmp_path / "tr" / "checkpoints")
    assert ck.state["world_size"] == 2 and ck.state["step"] == 6


# -- elastic restarts: a fresh store prefix for every worker group -------------------------


def _generations(store: torch.distributed.Store, world: int) -> list[str]:
    """Run :func:`_group_generation` for ``world`` ranks (threads) on one store."""
    out: list[str | BaseException] = [""] * world

    def rank(r: int) -> None:
        try:
            out[r] = _group_generation(store, r, world, timedelta(seconds=60), poll_s=0.001)
        except BaseException as e:  # handed to the test thread
            out[r] = e

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "the handshake hung"
    for o in out:
        if isinstance(o, BaseException):
            raise o
    return out  # type: ignore[return-value]


def test_group_generation_is_new_for_every_group() -> None:
    """Stale keys of earlier groups (a dead rank's hello, old answers) never leak into a new one."""
    store = torch.distributed.HashStore()
    # What dead groups can leave behind: a hello from a rank that never got its answer,
    # and an answered hello.
    store.set("acmix/pg/hello/2", "deadbeef")
    first = _generations(store, 3)
    assert len(set(first)) == 1 and re.fullmatch(r"[0-9a-f]{32}", first[0])
    second = _generations(store, 3)
    assert len(set(second)) == 1 and second[0] != first[0]
    # A smaller group after a larger one (elastic shrink): its hello keys are stale too.
    third = _generations(store, 2)
    assert len(set(third)) == 1 and third[0] not in (first[0], second[0])


def test_group_generation_times_out() -> None:
    """Rank 0 waiting for a rank that never comes fails with the ranks it misses."""
    store = torch.distributed.HashStore()
    store.set("acmix/pg/hello/1", "stale")  # a dead rank's: answered, never acknowledged
    with pytest.raises(TimeoutError, match=r"rank\(s\) \[1\] did not join"):
        _group_generation(store, 0, 2, timedelta(seconds=0.2), poll_s=0.01)


def _children(pid: int) -> list[int]:
    """PIDs of the processes whose parent is ``pid`` (from /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _worker_rank(pid: int) -> int | None:
    """The ``RANK`` torchrun gave worker ``pid`` (``None``: not a worker, or gone)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


def _last_step(ckpt_dir: Path) -> int | None:
    try:
        return int(json.loads((ckpt_dir / "last.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def _stop(procs: list[subprocess.Popen]) -> None:
    """Kill what is left of the launchers and their workers (each in its own session)."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers in /proc")
@pytest.mark.parametrize("agents", [1, 2], ids=["one-agent", "two-agents-c10d"])
def test_torchrun_restart_after_kill(fmnist_dir, tmp_path, agents: int) -> None:
    """`torchrun --max-restarts 1 ... --resume auto`: a worker killed with SIGKILL after the
    first checkpoint; the restarted group meets in the agent's store (whose keys of the dead
    group are still there), resumes from the last checkpoint and finishes the run.

    ``agents=2``: two torchrun agents (one worker each) on one c10d rendezvous, the
    reporter's two-node case.
    """
    port = _free_port()
    out = tmp_path / "run"
    ckpt_dir = out / "checkpoints"
    epochs = 12  # 6 steps an epoch; the kill lands after the first epoch's checkpoint
    if agents == 1:
        launch = ["--nnodes", "1", "--nproc-per-node", "2"]
        launch += ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    else:
        launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
        launch += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"restart{port}"]
        launch += ["--local-addr", "127.0.0.1"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *launch,
        "--max-restarts",
        "1",
        "--monitor-interval",
        "0.2",
        "-m",
        "acmix",
        "train",
        "--resume",
        "auto",
        *DDP_RUN,
        f"train.epochs={epochs}",
        "train.ema_decay=null",
        f"data.data_dir={fmnist_dir}",
        f"train.output={out}",
    ]
    env = {**os.environ, **_loopback_env(port), "OMP_NUM_THREADS": "1"}
    logs = [tmp_path / f"agent{a}.log" for a in range(agents)]
    procs = []
    try:
        for log in logs:
            with log.open("w") as f:
                procs.append(
                    subprocess.Popen(
                        cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                        start_new_session=True,
                    )
                )  # fmt: skip
        # Wait for the first checkpoint, then SIGKILL the worker of rank 1.
        deadline = time.monotonic() + 240
        while _last_step(ckpt_dir) is None:
            assert all(p.poll() is None for p in procs), "a launcher ended before a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.02)
        saved = _last_step(ckpt_dir)
        workers = [w for p in procs for w in _children(p.pid)]
        victim = [w for w in workers if _worker_rank(w) == 1]
        assert len(victim) == 1, f"workers {workers}: ranks {[_worker_rank(w) for w in workers]}"
        os.kill(victim[0], signal.SIGKILL)
        for p in procs:
            p.wait(timeout=max(1.0, deadline + 120 - time.monotonic()))
    finally:
        _stop(procs)
    text = "\n".join(log.read_text() for log in logs)
    assert [p.returncode for p in procs] == [0] * agents, text[-4000:]
    assert "starting a fresh run" in text, text[-4000:]
    total = epochs * 6
    resumed = [int(n) for n in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert len(resumed) == 1, text[-4000:]
    assert saved is not None and saved <= resumed[0] < total
    assert "DDP: weights identical on all 2 ranks" in text
    ck = load_checkpoint(ckpt_dir)
    assert ck.state["step"] == total and ck.state["world_size"] == 2
