"""DDP on CPU (gloo, loopback only): 2 processes == 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from acmix.engine import load_checkpoint, load_config, train
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
