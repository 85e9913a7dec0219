"""The training loop: one process or DDP, AMP, EMA, clipping, crash-safe checkpoints, signals.

:func:`train` runs a :class:`~acmix.engine.config.Config` end to end:

* data from :func:`acmix.data.build_data`, batches from
  :class:`~acmix.data.TrainBatchSampler` (the global batch split over the
  processes, so ``W`` processes see the same global batches as one);
* the model from timm (``acmix list-models``), optional ``channels_last``,
  ``torch.compile``, gradient checkpointing, DDP (gloo on CPU, NCCL on CUDA;
  SyncBatchNorm on CUDA; the BatchNorm running statistics made equal on all
  ranks before every evaluation and checkpoint, ``train.dist_bn``);
* timm's optimizers (layer decay too) and schedulers, stepped per update, AMP (bf16 autocast on
  CPU or GPU, fp16 with gradient scaling on GPU), gradient clipping, EMA,
  mixup / cutmix, label smoothing;
* at the end of each epoch: evaluation, a ``last`` (and ``best``)
  checkpoint, a row of ``metrics.csv`` / TensorBoard; at the end, PNG plots.

**Determinism.** The global RNGs are reseeded from ``(seed, step, rank)``
before every step and every sample's augmentation from ``(seed, epoch,
index)``, so a CPU run is bit-reproducible and ``--resume`` continues
bit-exactly (6 steps straight == 3 + resume + 3).

**Signals.** SIGINT / SIGTERM let the current step finish, save a ``last``
checkpoint and return (the CLI exits with ``128 + signal``); all processes
of a DDP run agree on the step. A second SIGINT interrupts at once.

**One run per directory.** Rank 0 holds ``<output>/run.lock``
(:func:`acmix.utils.io.exclusive_lock`) for the whole run; a second run into
the same directory fails at once with a :class:`~acmix.utils.io.LockError`
naming the holder's PID and command. The kernel drops the lock of a process
that dies (``kill -9`` too), so the next run takes it over.

**Non-finite values.** A loss that is NaN or infinite stops the run with a
:class:`NonFiniteError` before the step is applied (all processes of a DDP
run agree); the checkpoints already written stay as they are. Weights that
are not finite are never saved, and an evaluation whose loss is not finite
never becomes ``best``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.distributed as dist
import yaml
from torch import nn

from acmix.data import TrainBatchSampler, build_data, build_mixup, sample_seed
from acmix.engine.checkpoint import (
    CheckpointError,
    clean_checkpoint_dir,
    get_rng_state,
    load_checkpoint,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from acmix.engine.config import Config, ConfigError, ModelConfig, config_to_dict
from acmix.engine.description import ModelDescription
from acmix.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    cleanup_distributed,
    init_distributed,
    sync_norm_stats,
)
from acmix.engine.evaluate import evaluate
from acmix.engine.metrics import MetricsLogger, plot_alpha_beta, plot_curves
from acmix.engine.optim import LRSchedule, build_optimizer, peak_lr
from acmix.utils.io import LockError, exclusive_lock

__all__ = ["RUN_LOCK", "NonFiniteError", "TrainResult", "build_model", "seed_everything", "train"]

#: The run directory's lock file (held by rank 0 while a run is in progress).
RUN_LOCK = "run.lock"


class NonFiniteError(RuntimeError):
    """The training loss or the weights became NaN / infinite (the message says where)."""


@dataclass
class TrainResult:
    """What a run did.

    Attributes:
        output: the run directory.
        step: global optimizer steps done (all runs of a resumed job).
        epochs_done: complete epochs.
        val: last evaluation (``loss``, ``top1``, ``top5``, ``count``), or ``{}``.
        best_top1: best validation top-1 so far (``-1`` if none).
        images_per_s: training throughput of this run (all processes together).
        stopped: ``None`` (finished), ``"SIGINT"`` / ``"SIGTERM"`` or ``"stop_after_steps"``.
        checkpoint: the ``last`` manifest (rank 0), or ``None``.
        model: the trained model (unwrapped from DDP / compile).
        plots: the PNG files written.
        ranks_in_sync: DDP runs: weights and buffers bit-identical on all
            ranks at the end (``None`` for one process).
    """

    output: Path
    step: int = 0
    epochs_done: int = 0
    val: dict[str, float] = field(default_factory=dict)
    best_top1: float = -1.0
    images_per_s: float = 0.0
    stopped: str | None = None
    checkpoint: Path | None = None
    model: nn.Module | None = None
    plots: list[Path] = field(default_factory=list)
    ranks_in_sync: bool | None = None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def _seed_step(seed: int, step: int, rank: int) -> None:
    s = sample_seed(seed, (1 << 40) + rank, step)
    random.seed(s)
    np.random.seed(s & 0xFFFFFFFF)
    torch.manual_seed(s)


def build_model(cfg: ModelConfig, num_classes: int, in_chans: int) -> nn.Module:
    """``timm.create_model`` of the recipe's model, optionally initialised from weights.

    ``cfg.init_from`` (safetensors, a checkpoint, or an ``acmix convert``
    output) is loaded by name; a classifier whose shape differs is left at its
    fresh initialisation (fine-tuning to a new class count).
    """
    kwargs = dict(cfg.kwargs)
    if cfg.drop_path_rate > 0:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.drop_rate > 0:
        kwargs["drop_rate"] = cfg.drop_rate
    try:
        model = timm.create_model(cfg.name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(
                f"model.name: unknown model {cfg.name!r}; see `acmix list-models`"
            ) from None
        raise
    except (TypeError, ValueError) as e:  # a kwarg the model refuses, or a bad value
        raise ConfigError(
            f"model: cannot build {cfg.name!r} with model.kwargs={dict(cfg.kwargs)}: {e}"
        ) from None
    if cfg.init_from:
        sd = load_weights(cfg.init_from)
        own = model.state_dict()
        head = {k for k, v in sd.items() if k in own and v.shape != own[k].shape}
        if head:
            print(f"init_from: not loading {sorted(head)} (shape differs: new classifier)")
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in sd.items() if k not in head}, strict=False
        )
        missing = [k for k in missing if k not in head]
        if missing or unexpected:
            raise CheckpointError(
                f"{cfg.init_from} does not fit {cfg.name}: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}"
            )
    return model


class _StopFlag:
    """SIGINT / SIGTERM set a flag (checked between steps); a second SIGINT interrupts."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        print(f"\n{self.signal}: finishing this step, saving a checkpoint ...", file=sys.stderr)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(
    cfg: Config, resume: str | None = None, log: Callable[[str], None] | None = None
) -> TrainResult:
    """Train ``cfg``; see the module docstring.

    Args:
        cfg: the recipe.
        resume: ``None`` (fresh run), ``"auto"`` (resume from
            ``<output>/checkpoints`` if there is a checkpoint) or a checkpoint
            path (run directory, checkpoint directory or manifest).
        log: where rank 0's messages go (default: ``print``).

    Returns:
        A :class:`TrainResult` (on every rank).
    """
    info = init_distributed(cfg.train.device)
    started = info.distributed
    # Process-wide settings this run changes, restored afterwards.
    saved = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        with _run_lock(Path(cfg.train.output), info, log or print):
            return _Trainer(cfg, info, resume, log or print).run()
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1], warn_only=saved[2])
        if started:
            cleanup_distributed()


@contextlib.contextmanager
def _run_lock(out: Path, info: DistInfo, log: Callable[[str], None]) -> Any:
    """Rank 0 locks ``out`` for the run; every rank fails together when it cannot."""
    error: LockError | None = None
    with contextlib.ExitStack() as stack:
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            try:
                stale = stack.enter_context(
                    exclusive_lock(
                        out / RUN_LOCK,
                        what=f"run directory {out}",
                        hint="wait for that run to end, or give this one another train.output",
                    )
                )
            except LockError as e:
                error = e
            else:
                if stale is not None:
                    log(
                        f"{out / RUN_LOCK}: taking over the lock of a run that ended without "
                        f"releasing it (PID {stale.get('pid', '?')}, {stale.get('command', '?')})"
                    )
        if info.distributed:
            failed = all_reduce_sum([1.0 if error is not None else 0.0], info)[0]
            if failed and error is None:
                error = LockError(f"run directory {out} is in use (rank 0 could not lock it)")
        if error is not None:
            raise error
        yield


def _isatty(stream: Any) -> bool:
    """Whether ``stream`` is an interactive terminal (``False`` for files, pipes, captures)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Trainer:
    def __init__(
        self, cfg: Config, info: DistInfo, resume: str | None, log: Callable[[str], None]
    ) -> None:
        self.cfg = cfg
        self.info = info
        self.resume = resume
        self._log = log
        self.out = Path(cfg.train.output)
        self.ckpt_dir = self.out / "checkpoints"

    def log(self, msg: str) -> None:
        if self.info.is_main:
            self._log(msg)

    # -- setup --------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg, info = self.cfg, self.info
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            if info.device.type == "cuda":
                # cuBLAS needs this for deterministic results (read when cuBLAS starts).
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
        if cfg.train.amp == "fp16" and info.device.type != "cuda":
            raise ConfigError("train.amp='fp16' needs a CUDA device; use train.amp=bf16 on CPU")
        if cfg.data.batch_size % info.world_size:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} must be divisible by the "
                f"{info.world_size} processes"
            )
        local_batch = cfg.data.batch_size // info.world_size
        if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and local_batch % 2:
            raise ConfigError(f"mixup / cutmix need an even per-process batch, got {local_batch}")
        seed_everything(cfg.train.seed)
        pcfg = {}
        with contextlib.suppress(Exception):
            pcfg = timm.models.get_pretrained_cfg(cfg.model.name).to_dict()
        self.data = build_data(cfg.data, cfg.aug, pcfg)
        seed_everything(cfg.train.seed)
        model = build_model(cfg.model, self.data.num_classes, self.data.in_chans)
        model.to(info.device)
        if cfg.model.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if info.distributed and info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.sampler = TrainBatchSampler(
            len(self.data.train),  # type: ignore[arg-type]
            cfg.data.batch_size,
            info.rank,
            info.world_size,
            seed=cfg.train.seed,
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.peak = peak_lr(cfg.optim, cfg.data.batch_size)
        self.optimizer = build_optimizer(model, cfg.optim, self.peak)
        self.sched = LRSchedule(self.optimizer, cfg.sched, self.total_steps, self.steps_per_epoch)
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[
            cfg.train.amp
        ]
        self.scaler = torch.amp.GradScaler("cuda") if cfg.train.amp == "fp16" else None
        self.ema = None
        if cfg.train.ema_decay is not None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(model, decay=cfg.train.ema_decay)
        self.mixup = build_mixup(cfg.aug, self.data.num_classes)
        if self.mixup is not None:
            from timm.loss import SoftTargetCrossEntropy

            self.criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.aug.label_smoothing)
        self.step = 0
        self.best_top1 = -1.0
        self.last_saved = -1
        self.norm_synced = -1  # the step at which the BN statistics were last made equal
        self.last_manifest: Path | None = None
        if info.is_main:
            for p in clean_checkpoint_dir(self.ckpt_dir):
                self.log(f"removed a leftover of an interrupted run: {p}")
        self._maybe_resume()
        self.start_step = self.step
        ddp: nn.Module = model
        if info.distributed:
            ids = [info.device.index] if info.device.type == "cuda" else None
            # No buffer broadcast before every forward: each rank's BN statistics follow
            # its own batches and train.dist_bn combines them (the mean of all ranks'
            # with "reduce", not rank 0's alone) before evaluations and checkpoints.
            ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=ids, broadcast_buffers=False
            )
        self.fwd = torch.compile(ddp) if cfg.model.compile else ddp
        self.metrics = MetricsLogger(self.out, cfg.train.tensorboard, enabled=info.is_main)
        if self.step:
            self.metrics.truncate_after(self.step)
        elif info.is_main:
            for stale in (self.metrics.metrics_path, self.metrics.steps_path):
                stale.unlink(missing_ok=True)  # a fresh run in an old directory
            self.metrics.alpha_beta_path.unlink(missing_ok=True)
            self.metrics.log_start(model)
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(
                yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
            )

    def _maybe_resume(self) -> None:
        if self.resume is None:
            return
        if self.resume == "auto":
            if not (self.ckpt_dir / "last.json").is_file():
                self.log(f"no checkpoint in {self.ckpt_dir}: starting a fresh run")
                return
            path = self.ckpt_dir
        else:
            path = resolve_checkpoint(self.resume)
        ck = load_checkpoint(path, ema=self.ema is not None)
        if ck.state is None:
            raise CheckpointError(
                f"cannot resume from {ck.path}: a {ck.kind} file holds weights but no training "
                "state; resume from an acmix run (its directory or a manifest .json), or start "
                f"from the weights with model.init_from={ck.path}"
            )
        state = ck.state
        try:
            self.model.load_state_dict(ck.weights)
            self.optimizer.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None and ck.ema:
                self.ema.module.load_state_dict(ck.ema)
            set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(
                f"cannot resume from {ck.path}: it does not fit this run's model / recipe "
                f"({type(e).__name__}: {e})"
            ) from None
        self.step = int(state["step"])
        self.best_top1 = float(state.get("best_top1", -1.0))
        self.last_saved = self.step
        self.last_manifest = ck.path
        if self.step != self.sched.t:
            raise CheckpointError(f"{ck.path}: step {self.step} != scheduler step {self.sched.t}")
        self.log(
            f"resumed from {ck.path} at step {self.step} "
            f"(epoch {self.step // self.steps_per_epoch})"
        )

    # -- checkpoints --------------------------------------------------------------------------

    def _save(self, tags: tuple[str, ...], val: dict[str, float] | None = None) -> Path | None:
        """Checkpoint this step (rank 0); returns the manifest (the latest one if saved already)."""
        if self.last_saved == self.step and tags == ("last",):
            return self.last_manifest
        self.last_saved = self.step
        self._sync_norm_stats()
        if not self.info.is_main:
            return None
        self._check_finite_weights()
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": get_rng_state(),
            "step": self.step,
            "epoch": self.step // self.steps_per_epoch,
            "best_top1": self.best_top1,
            "world_size": self.info.world_size,
        }
        meta = {
            "epoch": self.step // self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "model": {
                "name": self.cfg.model.name,
                "kwargs": self.cfg.model.kwargs,
                "num_classes": self.data.num_classes,
                "in_chans": self.data.in_chans,
            },
            "data": self.data.info,
            "metrics": val or {},
            "config": config_to_dict(self.cfg),
            "torch": torch.__version__,
        }
        self.last_manifest = save_checkpoint(
            self.ckpt_dir,
            self.step,
            self.model.state_dict(),
            state,
            tags=tags,
            keep=self.cfg.train.keep,
            info=json.loads(json.dumps(meta, default=str)),
            ema=self.ema.module.state_dict() if self.ema is not None else None,
            description=ModelDescription.from_run(
                self.cfg.model.name,
                self.cfg.model.kwargs,
                self.data.num_classes,
                self.data.in_chans,
                self.data.info,
                num_features=getattr(self.model, "num_features", None),
            ),
        )
        return self.last_manifest

    def _check_finite_weights(self) -> None:
        """Raise :class:`NonFiniteError` rather than save a NaN / inf weight or buffer."""
        models = [("", self.model)]
        if self.ema is not None:
            models.append(("EMA ", self.ema.module))
        for what, model in models:
            for name, t in model.state_dict().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise NonFiniteError(
                        f"the {what}weights are not finite at step {self.step} ({name}); "
                        f"not saving them. The last checkpoint ({self.last_manifest}) is kept; "
                        "lower optim.lr or set optim.grad_clip"
                    )

    def _check_finite_loss(self, loss: torch.Tensor, epoch: int) -> None:
        """Raise :class:`NonFiniteError` (on every rank together) for a NaN / inf loss."""
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if self.info.distributed:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item():
            raise NonFiniteError(
                f"the training loss is {loss.item()} at step {self.step + 1} (epoch {epoch + 1}, "
                f"lr {self.sched.get_last_lr():g}); stopped before applying that step. "
                f"The last checkpoint ({self.last_manifest}) is kept. Lower optim.lr, set "
                "optim.grad_clip, or check the data and train.amp"
            )

    # -- loop ---------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.amp_dtype)

    def _stop_requested(self, flag: _StopFlag) -> str | None:
        stop = 1.0 if flag.signal else 0.0
        if self.info.distributed:
            t = torch.tensor([stop], device=self.info.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            stop = float(t.item())
        if stop:
            return flag.signal or "SIGTERM"
        return None

    def _stop_after_reached(self) -> bool:
        n = self.cfg.train.stop_after_steps
        return n is not None and self.step - self.start_step >= n

    def _sync_norm_stats(self) -> None:
        """DDP: the model's and the EMA's BN running statistics equal on all ranks (a collective).

        Called (on every rank) before each evaluation and checkpoint and at the end;
        once per step: the statistics change only in training steps.
        """
        if self.norm_synced == self.step:
            return
        self.norm_synced = self.step
        sync_norm_stats(self.model, self.info, self.cfg.train.dist_bn)
        if self.ema is not None:
            sync_norm_stats(self.ema.module, self.info, self.cfg.train.dist_bn)

    def _evaluate(self) -> dict[str, float]:
        cfg, info = self.cfg, self.info
        self._sync_norm_stats()  # every shard evaluated with the same statistics
        loader = self.data.val_loader(
            cfg.data.eval_batch_size, info.rank, info.world_size, cfg.data.workers, info.device
        )
        kwargs = dict(amp_dtype=self.amp_dtype, channels_last=cfg.model.channels_last)
        val = evaluate(self.model, loader, info, **kwargs)
        if self.ema is not None:
            ema_val = evaluate(self.ema.module, loader, info, **kwargs)
            val["ema_top1"] = ema_val["top1"]
        return val

    def run(self) -> TrainResult:
        self._setup()
        cfg, info = self.cfg, self.info
        self.log(
            f"{cfg.model.name} on {cfg.data.dataset}: {len(self.data.train)} train / "  # type: ignore[arg-type]
            f"{len(self.data.val)} val images, {self.data.num_classes} classes, "  # type: ignore[arg-type]
            f"{sum(p.numel() for p in self.model.parameters()):,} params; "
            f"{info.world_size} process(es) on {info.device}, global batch {cfg.data.batch_size}, "
            f"{self.steps_per_epoch} steps/epoch, peak lr {self.peak:g}"
        )
        if cfg.model.compile and info.is_main:
            # Said before it happens: torch.compile prints nothing while it works.
            print(
                "acmix: model.compile=true: the first training step (and the first evaluation) "
                "compile the model first, with no output meanwhile: usually 1-10 min on a CPU "
                "(longer for the large backbones), less on a GPU; later steps are fast",
                file=sys.stderr,
                flush=True,
            )
        result = TrainResult(output=self.out)
        images, train_time = 0, 0.0
        with _StopFlag() as flag, contextlib.closing(self.metrics):
            while self.step < self.total_steps:
                epoch, start = divmod(self.step, self.steps_per_epoch)
                stats, n_img, dt, stopped = self._train_epoch(epoch, start, flag)
                images += n_img
                train_time += dt
                result.images_per_s = images / max(train_time, 1e-9)
                if stopped is not None:
                    result.stopped = stopped
                    result.checkpoint = self._save(("last",))
                    self.log(
                        f"stopped ({stopped}) at step {self.step}; resume with "
                        f"--resume {self.ckpt_dir}"
                    )
                    break
                done = epoch + 1
                evaluated = done % cfg.train.eval_every == 0 or done == cfg.train.epochs
                val = self._evaluate() if evaluated else {}
                tags: tuple[str, ...] = ("last",)
                if val and not math.isfinite(val["loss"]):
                    self.log(f"warning: the validation loss is {val['loss']}: not a best")
                elif val and val["top1"] > self.best_top1:
                    self.best_top1 = val["top1"]
                    tags = ("last", "best")
                result.checkpoint = self._save(tags, val) or result.checkpoint
                if val:
                    result.val = val
                row = {
                    "epoch": done,
                    "step": self.step,
                    "lr": self.sched.get_last_lr(),
                    "train_loss": stats["loss"],
                    "train_top1": stats["top1"],
                    "val_loss": val.get("loss"),
                    "val_top1": val.get("top1"),
                    "val_top5": val.get("top5"),
                    "ema_val_top1": val.get("ema_top1"),
                    "images_per_s": n_img / max(dt, 1e-9),
                    "epoch_time_s": dt,
                }
                self.metrics.log_epoch(row, self.model)
                self.log(
                    f"epoch {done}/{cfg.train.epochs}: train loss {stats['loss']:.4f} "
                    f"top-1 {stats['top1']:.2f}%"
                    + (f" | val loss {val['loss']:.4f} top-1 {val['top1']:.2f}%" if val else "")
                    + f" | {n_img / max(dt, 1e-9):.0f} img/s, {dt:.1f}s"
                )
                if self._stop_after_reached():
                    result.stopped = "stop_after_steps"
                    break
        result.ranks_in_sync = self._ranks_in_sync()
        if info.is_main and cfg.train.plots and result.stopped is None:
            result.plots = self._plots()
        result.step = self.step
        result.epochs_done = self.step // self.steps_per_epoch
        result.best_top1 = self.best_top1
        result.model = self.model
        if info.is_main and result.checkpoint is None and (self.ckpt_dir / "last.json").is_file():
            result.checkpoint = self.ckpt_dir / "last.json"
        return result

    def _train_epoch(
        self, epoch: int, start: int, flag: _StopFlag
    ) -> tuple[dict[str, float], int, float, str | None]:
        cfg, info = self.cfg, self.info
        self.model.train()
        self.sampler.set_epoch(epoch, start)
        loader = self.data.train_loader(self.sampler, cfg.data.workers, cfg.train.seed, info.device)
        dev = info.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.float64, device=dev)
        count = 0
        # A bar only on a terminal: in a log file its \r redraws are noise; plain lines
        # every log_every steps there instead.
        show_bar = info.is_main and cfg.train.progress and _isatty(sys.stderr)
        bar = None
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(
                total=self.steps_per_epoch,
                initial=start,
                desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
                unit="step",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        stopped = None
        t0 = time.perf_counter()
        mark = (t0, 0.0, 0.0, 0)  # (time, loss sum, correct, count) at the last logged step
        for x, y in loader:
            _seed_step(cfg.train.seed, self.step, info.rank)
            x = x.to(dev, non_blocking=True)
            y = y.to(dev, non_blocking=True)
            if cfg.model.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            target = y
            if self.mixup is not None:
                x, target = self.mixup(x, y)
            with self._autocast():
                out = self.fwd(x)
                loss = self.criterion(out, target)
            self._check_finite_loss(loss, epoch)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                if cfg.optim.grad_clip is not None:
                    self.scaler.unscale_(self.optimizer)
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                if cfg.optim.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                self.optimizer.step()
            self.sched.step()
            self.step += 1
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            n = y.shape[0]
            loss_sum += loss.detach().double() * n
            correct += (out.detach().argmax(1) == y).sum()
            count += n
            k = self.step - epoch * self.steps_per_epoch
            if bar is not None:
                bar.update(1)
                if k % 5 == 0 or k == self.steps_per_epoch:
                    el = time.perf_counter() - t0
                    bar.set_postfix(
                        loss=f"{loss_sum.item() / count:.3f}",
                        acc=f"{100 * correct.item() / count:.1f}%",
                        img_s=f"{count * info.world_size / max(el, 1e-9):.0f}",
                    )
            elif info.is_main and k % cfg.train.log_every == 0:
                el = time.perf_counter() - t0
                rate = (k - start) / max(el, 1e-9)
                eta = (self.steps_per_epoch - k) / max(rate, 1e-9)
                self.log(
                    f"epoch {epoch + 1} step {k}/{self.steps_per_epoch} loss "
                    f"{loss_sum.item() / count:.4f} acc {100 * correct.item() / count:.1f}% "
                    f"{count * info.world_size / max(el, 1e-9):.0f} img/s eta {eta:.0f}s"
                )
            if info.is_main and self.step % cfg.train.log_every == 0:
                now = time.perf_counter()
                d_loss, d_corr = loss_sum.item() - mark[1], correct.item() - mark[2]
                d_n = count - mark[3]
                self.metrics.log_step(
                    self.step,
                    self.step / self.steps_per_epoch,
                    {
                        "loss": d_loss / max(d_n, 1),
                        "top1": 100.0 * d_corr / max(d_n, 1),
                        "lr": self.sched.get_last_lr(),
                        "images_per_s": d_n * info.world_size / max(now - mark[0], 1e-9),
                    },
                    self.model,
                )
                mark = (now, loss_sum.item(), correct.item(), count)
            stopped = self._stop_requested(flag)
            if stopped is None and self._stop_after_reached() and k < self.steps_per_epoch:
                stopped = "stop_after_steps"
            if stopped is not None:
                break
            # The last step of an epoch is saved after the evaluation, with its metrics.
            every = cfg.train.save_every_steps
            if every and self.step % every == 0 and k < self.steps_per_epoch:
                self._save(("last",))
        dt = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        total_loss, total_correct, total = all_reduce_sum(
            [loss_sum.item(), correct.item(), float(count)], info
        )
        stats = {
            "loss": total_loss / max(total, 1),
            "top1": 100.0 * total_correct / max(total, 1),
        }
        return stats, int(total), dt, stopped

    def _ranks_in_sync(self) -> bool | None:
        """DDP: are the weights and buffers bit-identical on every rank? (``None``: one process)."""
        if not self.info.distributed:
            return None
        self._sync_norm_stats()
        bad = torch.zeros((), device=self.info.device)
        for t in self.model.state_dict().values():
            ref = t.detach().clone()
            dist.broadcast(ref, src=0)
            bad += float(not torch.equal(ref, t))
        dist.all_reduce(bad)
        ok = bool(bad.item() == 0)
        if ok:
            self.log(f"DDP: weights identical on all {self.info.world_size} ranks")
        else:
            self.log(f"warning: DDP ranks diverged ({int(bad.item())} tensor(s) differ)")
        return ok

    def _plots(self) -> list[Path]:
        out = []
        p = plot_curves({self.cfg.model.name: self.out}, self.out / "curves.png")
        if p is not None:
            out.append(p)
        p = plot_alpha_beta(self.out / "alpha_beta.csv", self.out / "alpha_beta.png")
        if p is not None:
            out.append(p)
        return out
