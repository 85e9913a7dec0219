"""Process-group setup for ``torchrun`` (DDP): gloo on CPU, NCCL on CUDA.

``torchrun --nproc_per_node N -m acmix train ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` reads them. Without them the run is a single
process and nothing is initialised.

Multi-node (two machines with 8 GPUs each; run on every node, same
``--rdzv-endpoint``, reachable by all nodes)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29500 --rdzv-id myjob -m acmix train --config ...

**Elastic restarts** (``torchrun --max-restarts N ... --resume auto``).
torchrun's workers do not get a store of their own: with
``TORCHELASTIC_USE_AGENT_STORE=True`` every worker is a client of the
agent's TCPStore at ``MASTER_ADDR:MASTER_PORT``, which outlives the workers.
A restarted group would find the dead group's keys there (gloo's peer
addresses, barrier counters) and hang or fail in ``connectFullMesh`` with
"Connection refused" (torch 2.14.1's ``env://`` does not prefix the keys
per attempt).
:func:`init_distributed` therefore builds the process group on a
``PrefixStore`` that is new for every worker group: rank 0 draws a random
generation and hands it to every other rank through a handshake keyed by that
rank's own random nonce (:func:`_group_generation`), so nothing a previous
group wrote can be mistaken for this one's. ``TORCHELASTIC_RESTART_COUNT`` is
not enough as a prefix: it counts the restarts of *this* agent, and an agent
that restarts its workers for a membership change (another node failed,
joined or was replaced) does not count it, so two nodes can disagree on it.
Without an agent store (one process, ``mp.spawn`` with ``MASTER_ADDR`` /
``MASTER_PORT``, ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``) rank 0 serves a
fresh store and ``env://`` is used as is.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from acmix.engine.config import DIST_BN_MODES

__all__ = [
    "DIST_BN_MODES",
    "DistInfo",
    "all_reduce_sum",
    "cleanup_distributed",
    "init_distributed",
    "sync_norm_stats",
]

#: The buffers :func:`sync_norm_stats` makes equal: BatchNorm's (and any norm layer's
#: that follows its names) running statistics.
_NORM_STATS = ("running_mean", "running_var")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (the GPU index).
        device: this process's device.
        backend: ``"gloo"``, ``"nccl"`` or ``""`` (single process).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = ""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device='cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(device: str = "auto") -> DistInfo:
    """Initialise the process group from torchrun's environment (if any) and pick the device.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        A :class:`DistInfo`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world <= 1:
        return DistInfo(device=dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            store = _worker_group_store(rank, world, dist.default_pg_timeout)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        else:
            dist.init_process_group(
                backend=backend, init_method="env://", rank=rank, world_size=world
            )
    return DistInfo(rank, world, local_rank, dev, backend)


#: Keys of the handshake in the agent's store (see :func:`_group_generation`).
_HANDSHAKE = "acmix/pg"


def _worker_group_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The agent's TCPStore, prefixed anew for this worker group (see the module docstring)."""
    agent_store = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=int(os.environ["MASTER_PORT"]),
        world_size=world,
        is_master=False,
        timeout=timeout,
    )
    generation = _group_generation(agent_store, rank, world, timeout)
    return dist.PrefixStore(f"{_HANDSHAKE}/{generation}/", agent_store)


def _group_generation(
    store: dist.Store, rank: int, world: int, timeout: timedelta, poll_s: float = 0.02
) -> str:
    """Agree with the other ranks on a name that no earlier worker group used.

    Works in a store that still holds the keys of earlier groups (their ranks
    are dead: an agent stops its workers before the next rendezvous, and that
    rendezvous completes only when every agent has joined it). Rank 0 draws a
    random generation. Every other rank ``r`` writes a random nonce to
    ``hello/r`` and waits for ``welcome/<nonce>``, a key no one else can have
    written; rank 0 answers each nonce it reads in ``hello/r`` (a stale one
    gets an answer no one reads) until rank ``r`` acknowledges under
    ``ack/<generation>/r``.

    Args:
        store: the store shared by all ranks.
        rank: this process's rank.
        world: number of processes.
        timeout: how long to wait for the other ranks.
        poll_s: rank 0's polling interval in seconds.

    Returns:
        The generation (32 hex digits), the same on every rank.

    Raises:
        TimeoutError: a rank did not answer within ``timeout``.
    """
    if rank != 0:
        nonce = uuid.uuid4().hex
        welcome = f"{_HANDSHAKE}/welcome/{nonce}"
        store.set(f"{_HANDSHAKE}/hello/{rank}", nonce)
        try:
            store.wait([welcome], timeout)
        except dist.DistStoreError as e:
            raise TimeoutError(
                f"rank {rank}: rank 0 did not answer within {timeout} ({e})"
            ) from None
        generation = store.get(welcome).decode()
        store.delete_key(welcome)
        store.set(f"{_HANDSHAKE}/ack/{generation}/{rank}", "1")
        return generation
    generation = uuid.uuid4().hex
    answered: dict[int, bytes] = {}
    pending = set(range(1, world))
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        for r in sorted(pending):
            if store.check([f"{_HANDSHAKE}/ack/{generation}/{r}"]):
                pending.discard(r)
            elif store.check([f"{_HANDSHAKE}/hello/{r}"]):
                nonce = store.get(f"{_HANDSHAKE}/hello/{r}")
                if answered.get(r) != nonce:
                    store.set(f"{_HANDSHAKE}/welcome/{nonce.decode()}", generation)
                    answered[r] = nonce
        if not pending:
            return generation
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank 0: rank(s) {sorted(pending)} did not join the process group within {timeout}"
            )
        time.sleep(poll_s)


def cleanup_distributed() -> None:
    """Destroy the process group if one is up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a list of numbers over all processes (float64; identity for one process)."""
    if not info.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@torch.no_grad()
def sync_norm_stats(model: nn.Module, info: DistInfo, mode: str) -> int:
    """Make the normalisation running statistics of ``model`` the same on every rank.

    DDP keeps parameters equal, but a BatchNorm layer's ``running_mean`` and
    ``running_var`` follow the batches of its own rank (SyncBatchNorm, which
    would share the batch statistics, supports only GPUs: torch 2.14.1 refuses
    CPU tensors). Before an evaluation or a checkpoint they are averaged
    (``"reduce"``, timm's ``--dist-bn reduce``) or copied from rank 0
    (``"broadcast"``). Both update rules are linear, so the mean of the ranks'
    statistics is also the statistics of the mean of their batch statistics.
    The mean is taken in float64 and rounded once: statistics that are equal on
    all ranks (SyncBatchNorm) stay bit-for-bit as they are. Every rank must
    call this at the same point (it is a collective).

    Args:
        model: the module (not its DDP wrapper); its buffers are updated in place.
        info: where this process stands (nothing happens for one process).
        mode: ``"reduce"``, ``"broadcast"`` or ``"none"`` (nothing happens).

    Returns:
        How many buffers were synchronised.

    Raises:
        ValueError: ``mode`` is not one of :data:`DIST_BN_MODES`.
    """
    if mode not in DIST_BN_MODES:
        raise ValueError(f"dist_bn must be one of {list(DIST_BN_MODES)}, got {mode!r}")
    if not info.distributed or mode == "none":
        return 0
    bufs = [
        b
        for name, b in model.named_buffers()
        if name.rsplit(".", 1)[-1] in _NORM_STATS and b.is_floating_point()
    ]
    if not bufs:
        return 0
    # One collective for all of them (float64 holds every float dtype's values exactly).
    flat = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in bufs])
    if mode == "reduce":
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= info.world_size
    else:
        dist.broadcast(flat, src=0)
    offset = 0
    for b in bufs:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
    return len(bufs)
