"""Typed training configuration: nested dataclasses, YAML recipes, ``key=value`` overrides.

A recipe is a YAML mapping with the sections of :class:`Config` (``model``,
``data``, ``aug``, ``optim``, ``sched``, ``train``; ``data`` and ``aug`` are
:mod:`acmix.data.config`'s, re-exported here); every key must be a field
of its section, and every value is checked against the field's type. Unknown
keys are an error naming the key and the known ones. Command-line overrides
use dotted paths, ``optim.lr=0.05``; values are parsed as YAML
(``train.amp=bf16``, ``aug.scale=[0.5,1]``, ``model.kwargs.mixer=conv``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from acmix.data.config import AugConfig, DataConfig
from acmix.utils.config import (
    ConfigError,
    check_config_choice,
    check_config_finite,
    check_config_range,
)
from acmix.utils.recipes import find_recipe, recipe_dirs  # noqa: F401 (recipe_dirs: re-exported)

__all__ = [
    "DIST_BN_MODES",
    "SCHEDULERS",
    "AugConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "known_optimizers",
    "load_config",
]


@dataclass
class ModelConfig:
    """The network.

    Attributes:
        name: a timm model name (``acmix list-models``), e.g. ``acmix_resnet50``.
        kwargs: further keyword arguments of ``timm.create_model`` (``mixer``,
            ``img_size``, ...). ``num_classes`` and ``in_chans`` come from the data.
        drop_path_rate: stochastic depth (passed when > 0).
        drop_rate: classifier dropout (passed when > 0).
        init_from: safetensors weights (or a checkpoint) to start from, e.g.
            the output of ``acmix convert``; the classifier is re-initialised
            when its shape differs.
        channels_last: NHWC memory format for weights and inputs.
        compile: wrap the model in ``torch.compile``.
        grad_checkpointing: recompute activations in the backward pass.
    """

    name: str = "acmix_tiny"
    kwargs: dict[str, Any] = field(default_factory=dict)
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    init_from: str | None = None
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_config_finite("model", self)
        check_config_range("model.drop_path_rate", self.drop_path_rate, 0.0, 0.99)
        check_config_range("model.drop_rate", self.drop_rate, 0.0, 0.99)
        for key in ("num_classes", "in_chans"):
            if key in self.kwargs:
                raise ConfigError(f"model.kwargs.{key} is set from the data; remove it")


#: ``train.dist_bn`` values (see :func:`acmix.engine.distributed.sync_norm_stats`).
DIST_BN_MODES: tuple[str, ...] = ("reduce", "broadcast", "none")

#: ``sched.name`` values: timm's schedulers that step per optimizer update
#: (``create_scheduler_v2``; ``plateau`` steps per epoch on a metric and is left out).
SCHEDULERS: tuple[str, ...] = (
    "cosine",
    "tanh",
    "poly",
    "step",
    "multistep",
    "wsd",
    "rsqrt",
    "constant",
)


def known_optimizers() -> list[str]:
    """The ``optim.name`` values: every optimizer timm's registry knows (``list_optimizers()``).

    Each may also be written ``lookahead_<name>`` (timm wraps it in Lookahead).
    """
    from timm.optim import list_optimizers

    return list(list_optimizers())


def _check_optimizer(name: str, betas: tuple[float, ...] | None) -> None:
    """``optim.name`` must be an optimizer timm knows; ``optim.betas`` must fit it."""
    base = name.removeprefix("lookahead_")
    known = known_optimizers()
    if base not in known:
        raise ConfigError(
            f"optim.name must be an optimizer timm knows (or lookahead_<name>), got {name!r}; "
            f"known: {', '.join(known)}"
        )
    if betas is not None:
        from timm.optim import get_optimizer_info

        info = get_optimizer_info(base)
        if info.has_betas and len(betas) != info.num_betas:
            raise ConfigError(
                f"optim.betas: {base} takes {info.num_betas} betas, "
                f"got {len(betas)} ({list(betas)})"
            )


@dataclass
class OptimConfig:
    """Optimiser: any of timm's (``timm.optim.create_optimizer_v2``).

    Attributes:
        name: an optimizer timm knows (:func:`known_optimizers`): ``"sgd"``,
            ``"adamw"``, ``"lamb"``, ``"lion"``, ``"adan"``, ... or
            ``"lookahead_<name>"``. ``"sgd"`` is SGD with momentum, Nesterov only
            with ``nesterov: true`` (as before; timm's own ``"sgd"`` default is
            Nesterov).
        lr: peak learning rate at ``lr_base_batch`` (or at the actual batch).
        lr_base_batch: scale ``lr`` to the global batch, ``lr * batch_size /
            lr_base_batch`` (``lr_base_scale="linear"``) or its square root
            (``"sqrt"``); ``None``: no scaling.
        lr_base_scale: ``"linear"`` or ``"sqrt"`` scaling of ``lr`` with the batch.
        momentum: momentum of the optimizers that take one (SGD family, Muon, ...).
        nesterov: Nesterov momentum, for the optimizers that take a ``nesterov``
            argument (it overrides timm's per-name default).
        betas: the optimizer's betas (as many as it takes: 2, 3 for Adan);
            ``None``: its default. Ignored by optimizers without betas.
        eps: the optimizer's epsilon; ``None``: its default. Ignored by
            optimizers without one.
        weight_decay: decoupled (AdamW, ...) or L2 (SGD) weight decay.
        decay_1d: also decay 1-D parameters (norms, biases) and the model's
            ``no_weight_decay()`` set (ACmix's alpha, beta); ``False`` excludes them.
        layer_decay: layer-wise learning-rate decay (BEiT / timm's
            ``--layer-decay``): the layer ``i`` of ``L`` (the model's
            ``group_matcher``) learns at ``lr * layer_decay ** (L - 1 - i)``;
            ``None``: off.
        kwargs: further keyword arguments of the optimizer, e.g. ``{caution: true}``.
        grad_clip: clip the global gradient norm to this (``None``: off).
    """

    name: str = "sgd"
    lr: float = 0.1
    lr_base_batch: int | None = None
    lr_base_scale: str = "linear"
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, ...] | None = None
    eps: float | None = None
    weight_decay: float = 1e-4
    decay_1d: bool = True
    layer_decay: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    grad_clip: float | None = None

    def __post_init__(self) -> None:
        check_config_finite("optim", self)
        _check_optimizer(self.name, self.betas)
        check_config_choice("optim.lr_base_scale", self.lr_base_scale, ("linear", "sqrt"))
        check_config_range("optim.lr", self.lr, 0.0)
        check_config_range("optim.momentum", self.momentum, 0.0, 1.0, hi_open=True)
        for i, beta in enumerate(self.betas or ()):
            check_config_range(f"optim.betas[{i}]", beta, 0.0, 1.0, hi_open=True)
        if self.eps is not None:
            check_config_range("optim.eps", self.eps, 0.0, lo_open=True)
        check_config_range("optim.weight_decay", self.weight_decay, 0.0)
        if self.lr_base_batch is not None:
            check_config_range("optim.lr_base_batch", self.lr_base_batch, 1)
        if self.layer_decay is not None:
            check_config_range("optim.layer_decay", self.layer_decay, 0.0, 1.0, lo_open=True)
        for key in ("params", "lr", "weight_decay", "momentum", "betas", "eps", "nesterov"):
            if key in self.kwargs:
                raise ConfigError(f"optim.kwargs.{key}: set optim.{key} instead")
        if self.grad_clip is not None:
            check_config_range("optim.grad_clip", self.grad_clip, 0.0, lo_open=True)


@dataclass
class SchedConfig:
    """Learning-rate schedule: timm's schedulers, stepped after every optimizer update.

    Epoch quantities are converted to optimizer steps (rounded) with the run's
    steps per epoch, so fractions are allowed. ``cosine``, ``tanh`` and
    ``poly`` decay over the steps after the warm-up (timm's
    ``warmup_prefix=True``: the learning rate is ``peak`` at the warm-up's end
    and ``min_lr`` after the last step); ``step`` and ``multistep`` count
    their epochs from the start of the run; ``wsd`` / ``rsqrt`` fit their
    stable and decay phases after the warm-up.

    Attributes:
        name: one of :data:`SCHEDULERS` (timm's): ``"cosine"`` (to ``min_lr``
            at the last step), ``"tanh"``, ``"poly"`` (power ``decay_rate``),
            ``"step"`` (times ``decay_rate`` every ``decay_epochs``),
            ``"multistep"`` (times ``decay_rate`` at each of ``decay_milestones``),
            ``"wsd"`` (warm-up, stable, decay over ``decay_epochs``), ``"rsqrt"``,
            ``"constant"``.
        warmup_epochs: linear warm-up from ``warmup_lr`` (fractions allowed).
        warmup_lr: learning rate of the first step.
        min_lr: final learning rate (cosine, tanh, poly, wsd, rsqrt).
        decay_epochs: ``step``: epochs between decays (``None``: 90); ``wsd`` /
            ``rsqrt``: length of the decay phase, in epochs or, below 1, as a
            fraction of the steps after the warm-up (``None``: 0.2).
        decay_milestones: ``multistep``: the epochs at which the rate decays.
        decay_rate: ``step`` / ``multistep``: the factor per decay; ``poly``: the power.
    """

    name: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    min_lr: float = 0.0
    decay_epochs: float | None = None
    decay_milestones: tuple[float, ...] = (90.0, 180.0, 270.0)
    decay_rate: float = 0.1

    def __post_init__(self) -> None:
        check_config_finite("sched", self)
        check_config_choice("sched.name", self.name, SCHEDULERS)
        check_config_range("sched.warmup_epochs", self.warmup_epochs, 0.0)
        check_config_range("sched.warmup_lr", self.warmup_lr, 0.0)
        check_config_range("sched.min_lr", self.min_lr, 0.0)
        if self.decay_epochs is not None:
            check_config_range("sched.decay_epochs", self.decay_epochs, 0.0, lo_open=True)
        for i, m in enumerate(self.decay_milestones):
            check_config_range(f"sched.decay_milestones[{i}]", m, 0.0)
        check_config_range("sched.decay_rate", self.decay_rate, 0.0, lo_open=True)


@dataclass
class TrainConfig:
    """The run.

    Attributes:
        epochs: training epochs.
        seed: seed of data order, augmentation, initialisation and dropout.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``.
        threads: CPU threads of this process (``None``: torch's default).
        amp: ``"none"``, ``"bf16"`` (autocast; CPU or GPU) or ``"fp16"`` (GPU,
            with gradient scaling).
        ema_decay: keep an exponential moving average of the weights (``None``: off).
        deterministic: deterministic algorithms (CPU runs are bit-reproducible).
        output: run directory (checkpoints, ``metrics.csv``, TensorBoard, plots).
        eval_every: evaluate every this many epochs (and after the last).
        log_every: progress / log line every this many steps.
        keep: step checkpoints kept besides ``last`` and ``best``.
        save_every_steps: also checkpoint every this many steps (``None``:
            at the end of each epoch only).
        stop_after_steps: end this run (this invocation) after this many
            optimizer steps, saving a checkpoint, without changing the
            schedule; a later ``--resume`` continues (time-boxed jobs).
        dist_bn: DDP: how the BatchNorm running statistics (``running_mean``
            / ``running_var``, which every rank updates from its own share of
            the batch) are made identical on all ranks before every evaluation,
            every checkpoint and at the end: ``"reduce"`` (their mean over the
            ranks; timm's ``--dist-bn reduce``), ``"broadcast"`` (rank 0's) or
            ``"none"`` (left per rank: evaluation shards then use different
            statistics and the end-of-run check reports the ranks as diverged).
            Of the model and of its EMA. Training itself (batch statistics,
            weights) is the same with each; on CUDA the layers are
            SyncBatchNorm (batch statistics over all ranks) as well.
        tensorboard: write TensorBoard events (needs the ``tensorboard`` package).
        plots: write PNG plots at the end (needs ``matplotlib``).
        progress: a progress bar on a terminal (otherwise, and when stderr is
            not a terminal, a log line every ``log_every`` steps).
    """

    epochs: int = 10
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    amp: str = "none"
    ema_decay: float | None = None
    deterministic: bool = True
    output: str = "runs/acmix"
    eval_every: int = 1
    log_every: int = 50
    keep: int = 2
    save_every_steps: int | None = None
    stop_after_steps: int | None = None
    dist_bn: str = "reduce"
    tensorboard: bool = True
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        check_config_finite("train", self)
        check_config_choice("train.amp", self.amp, ("none", "bf16", "fp16"))
        check_config_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        check_config_choice("train.dist_bn", self.dist_bn, DIST_BN_MODES)
        for key in ("epochs", "eval_every", "log_every"):
            check_config_range(f"train.{key}", getattr(self, key), 1)
        check_config_range("train.keep", self.keep, 0)
        for key in ("threads", "save_every_steps", "stop_after_steps"):
            if getattr(self, key) is not None:
                check_config_range(f"train.{key}", getattr(self, key), 1)
        if self.ema_decay is not None:
            check_config_range("train.ema_decay", self.ema_decay, 0.0, 1.0)


@dataclass
class Config:
    """A whole training recipe (one section per dataclass)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# -- conversion -----------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (lists become tuples, ints floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            if not isinstance(value, list | tuple):
                raise ConfigError(f"{key}: expected a list, got {value!r}")
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(
            _coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args, strict=True))
        )
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # pragma: no cover


def _section_from_dict(cls: type, values: Any, prefix: str) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}.{key}'; {prefix} has: {names}")
        kwargs[key] = _coerce(f"{prefix}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    """Build a :class:`Config` from nested plain values (a parsed recipe).

    Raises:
        ConfigError: an unknown section or key (named), or a value of the wrong type.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"a recipe must be a mapping of sections, got {type(values).__name__}")
    hints = typing.get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config)]
    for key in values:
        if key not in sections:
            raise ConfigError(f"unknown config section '{key}'; sections: {sections}")
    return Config(**{s: _section_from_dict(hints[s], values.get(s), s) for s in sections})


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested values (tuples as lists): YAML / JSON serialisable, round-trips."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def apply_overrides(
    values: dict[str, Any], overrides: list[str | tuple[str, Any]]
) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested dict.

    An override may also be a ``(dotted key, value)`` pair, taken as it is
    (no YAML parsing: for typed command-line flags). Keys under
    ``model.kwargs`` may be anything (they go to the model); every other key
    is checked when the result passes :func:`config_from_dict`.

    Raises:
        ConfigError: an override that is not ``KEY=VALUE`` with a dotted key.
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for item in overrides:
        if isinstance(item, tuple):
            key, value = item
            parts = key.split(".")
        else:
            key, sep, raw = item.partition("=")
            parts = key.strip().split(".")
            if not sep or len(parts) < 2 or not all(parts):
                raise ConfigError(
                    f"override {item!r}: expected SECTION.KEY=VALUE, e.g. optim.lr=0.05 or "
                    "model.kwargs.mixer=conv"
                )
            try:
                value = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as e:
                raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
            node[p] = dict(nxt)
            node = node[p]
        node[parts[-1]] = value
    return out


def load_config(
    path: str | os.PathLike | None, overrides: list[str | tuple[str, Any]] | None = None
) -> Config:
    """Read a YAML recipe (or start from the defaults), apply overrides, validate.

    Args:
        path: a recipe file; a bare name (``fmnist_tiny``) is looked up as
            ``configs/<name>.yaml`` under the working directory, then among the
            recipes shipped with the package (:mod:`acmix.utils.recipes`).
            ``None``: the defaults.
        overrides: ``section.key=value`` strings or ``(key, value)`` pairs.

    Raises:
        FileNotFoundError: no such recipe (the paths tried are named).
        ConfigError: a recipe that is not UTF-8 YAML, an unknown key, a wrong
            type, or a bad value.
    """
    values: dict[str, Any] = {}
    if path is not None:
        file = _find_recipe(path)
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{file}: not a UTF-8 text file ({e})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{file}: not valid YAML ({e})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{file}: a recipe must be a mapping of sections")
        values = loaded or {}
    values = apply_overrides(values, list(overrides or []))
    return config_from_dict(values)


def _find_recipe(path: str | os.PathLike) -> Path:
    return find_recipe(path)
