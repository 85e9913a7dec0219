"""Training and evaluation: typed configs, the train loop, checkpoints, DDP, metrics, export.

Entry points: :func:`train` (a whole run from a :class:`Config`),
:func:`evaluate`, :func:`load_config`, :func:`save_checkpoint` /
:func:`load_checkpoint` (any path :func:`resolve_checkpoint` accepts), :func:`load_model`,
:func:`export_onnx`; :class:`ModelDescription` is what every weights file says about itself. The
``acmix`` command wraps them (``acmix train --help``).
"""

from acmix.engine.checkpoint import (
    Checkpoint,
    CheckpointError,
    atomic_write_bytes,
    clean_checkpoint_dir,
    load_checkpoint,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
)
from acmix.engine.config import (
    AugConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    SchedConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from acmix.engine.description import ModelDescription
from acmix.engine.distributed import DistInfo, init_distributed
from acmix.engine.evaluate import evaluate
from acmix.engine.inference import (
    ExportReport,
    LoadedModel,
    export_onnx,
    load_model,
    predict_images,
)
from acmix.engine.metrics import alpha_beta, plot_alpha_beta, plot_curves
from acmix.engine.optim import LRSchedule, build_optimizer, peak_lr
from acmix.engine.trainer import NonFiniteError, TrainResult, build_model, train
from acmix.utils.io import LockError

__all__ = [
    "AugConfig",
    "Checkpoint",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistInfo",
    "ExportReport",
    "LRSchedule",
    "LoadedModel",
    "LockError",
    "ModelConfig",
    "ModelDescription",
    "NonFiniteError",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "TrainResult",
    "alpha_beta",
    "apply_overrides",
    "atomic_write_bytes",
    "build_model",
    "build_optimizer",
    "clean_checkpoint_dir",
    "config_from_dict",
    "config_to_dict",
    "evaluate",
    "export_onnx",
    "init_distributed",
    "load_checkpoint",
    "load_config",
    "load_model",
    "load_weights",
    "peak_lr",
    "plot_alpha_beta",
    "plot_curves",
    "predict_images",
    "resolve_checkpoint",
    "save_checkpoint",
    "train",
]
