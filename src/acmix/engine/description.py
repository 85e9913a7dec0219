"""What a weights file holds, in timm's words: architecture, kwargs, classes, preprocessing.

A :class:`ModelDescription` is everything needed to use a set of weights
without the run that made them: the timm name and the ``create_model``
kwargs that rebuild the network, the class count and names, the input
channels, and the evaluation preprocessing (input size, mean, std, crop
fraction and mode, interpolation, PIL image mode). Every save writes it
twice, in two forms:

* in the safetensors header of each weights file (model and EMA), as flat
  string entries (:meth:`ModelDescription.to_metadata`; lists and dicts as
  JSON), so a lone ``.safetensors`` file describes itself;
* as a timm / Hugging Face hub ``config.json`` (:meth:`ModelDescription.to_config`),
  the layout timm's ``save_for_hf`` writes and ``load_model_config_from_hf`` /
  ``load_model_config_from_path`` read::

      {"architecture": "acmix_tiny", "num_classes": 10, "num_features": 32,
       "label_names": ["T-shirt/top", ...], "img_mode": "L",
       "model_args": {"stem_stride": 2, ..., "in_chans": 1},
       "pretrained_cfg": {"input_size": [1, 28, 28], "mean": [0.286], "std": [0.353],
                          "crop_pct": 1.0, "crop_mode": "squash",
                          "interpolation": "bilinear", "num_classes": 10}}

  ``model_args`` holds every ``create_model`` kwarg but ``num_classes`` (top
  level, as in timm), so ``timm.create_model(cfg["architecture"],
  num_classes=cfg["num_classes"], **cfg["model_args"])`` rebuilds the network;
  ``pretrained_cfg`` holds only :class:`timm.models.PretrainedCfg` fields.

``crop_mode`` follows timm: ``"center"`` resizes to ``size / crop_pct`` and
crops the centre (image folders); ``"squash"`` with ``crop_pct = 1`` resizes
straight to ``size x size`` (the in-memory data sets).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from acmix.utils.io import CheckpointError

__all__ = ["ModelDescription"]

#: The safetensors metadata keys a description is written as (values are strings).
METADATA_KEYS: tuple[str, ...] = (
    "architecture",
    "model_args",
    "num_classes",
    "in_chans",
    "num_features",
    "input_size",
    "mean",
    "std",
    "crop_pct",
    "crop_mode",
    "interpolation",
    "img_mode",
    "label_names",
)

_CROP_MODES = ("center", "squash", "border")


@dataclass(frozen=True)
class ModelDescription:
    """The network and preprocessing of a set of weights.

    Attributes:
        architecture: the timm model name (``acmix_tiny``, ``acmix_resnet50``, ...).
        model_args: ``timm.create_model`` kwargs other than ``num_classes`` and
            ``in_chans`` (``stem_stride``, ``widths``, ``mixer``, ...).
        num_classes: classifier outputs.
        in_chans: input channels.
        input_size: ``(C, H, W)`` of the evaluation input.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        crop_pct: timm's evaluation crop fraction.
        crop_mode: ``"center"`` (resize to ``H / crop_pct``, centre crop) or
            ``"squash"`` (resize to ``H x W``).
        interpolation: resize interpolation (``"bilinear"``, ``"bicubic"``, ...).
        img_mode: the PIL mode images are read in (``"L"``, ``"RGB"``).
        label_names: class names in label order (``()``: unknown).
        num_features: width of the pooled features (informational, as in timm).
    """

    architecture: str
    model_args: dict[str, Any] = field(default_factory=dict)
    num_classes: int = 1000
    in_chans: int = 3
    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bilinear"
    img_mode: str = "RGB"
    label_names: tuple[str, ...] = ()
    num_features: int | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_run(
        cls,
        architecture: str,
        model_args: Mapping[str, Any],
        num_classes: int,
        in_chans: int,
        data: Mapping[str, Any],
        num_features: int | None = None,
    ) -> ModelDescription:
        """The description of a training run's model.

        Args:
            architecture: ``model.name``.
            model_args: ``model.kwargs`` (``num_classes`` / ``in_chans`` are ignored).
            num_classes: the data's class count.
            in_chans: the data's channels.
            data: the data's description (:attr:`acmix.data.DataBundle.info`:
                ``img_size``, ``mean``, ``std``, ``crop_pct``, ``center_crop``,
                ``interpolation``, ``classes``).
            num_features: the model's ``num_features``.
        """
        size = int(data.get("img_size", 224))
        center = bool(data.get("center_crop", True))
        return cls(
            architecture=architecture,
            model_args=_plain_args(model_args),
            num_classes=int(num_classes),
            in_chans=int(in_chans),
            input_size=(int(in_chans), size, size),
            mean=tuple(float(v) for v in data.get("mean", ())),
            std=tuple(float(v) for v in data.get("std", ())),
            crop_pct=float(data.get("crop_pct") or (0.875 if center else 1.0)),
            crop_mode="center" if center else "squash",
            interpolation=str(data.get("interpolation", "bilinear")),
            img_mode="L" if int(in_chans) == 1 else "RGB",
            label_names=tuple(str(c) for c in data.get("classes", ())),
            num_features=None if num_features is None else int(num_features),
        )

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ModelDescription | None:
        """The description an older manifest's ``model`` and ``data`` sections give, or ``None``."""
        model = manifest.get("model")
        if not isinstance(model, Mapping) or not isinstance(model.get("name"), str):
            return None
        data = manifest.get("data") if isinstance(manifest.get("data"), Mapping) else {}
        in_chans = int(model.get("in_chans", data.get("in_chans", 3)))
        num_classes = int(model.get("num_classes", len(data.get("classes", ())) or 1000))
        return cls.from_run(model["name"], model.get("kwargs") or {}, num_classes, in_chans, data)

    @classmethod
    def from_config(cls, cfg: Any, source: str) -> ModelDescription:
        """Parse a timm / Hugging Face hub ``config.json`` (as :meth:`to_config` writes it).

        Also reads timm's older single-dict form (the ``pretrained_cfg`` keys at
        the top level), as :func:`timm.models.load_model_config_from_hf` does.

        Args:
            cfg: the parsed JSON.
            source: the file, for error messages.

        Raises:
            CheckpointError: a missing or malformed entry (named with ``source``).
        """
        if not isinstance(cfg, Mapping):
            raise CheckpointError(f"{source}: not a model config (expected a JSON object)")
        pcfg = cfg.get("pretrained_cfg", cfg)
        if not isinstance(pcfg, Mapping):
            raise CheckpointError(f"{source}: 'pretrained_cfg' must be an object, got {pcfg!r}")
        args = cfg.get("model_args") or {}
        if not isinstance(args, Mapping):
            raise CheckpointError(f"{source}: 'model_args' must be an object, got {args!r}")
        arch = cfg.get("architecture")
        if not isinstance(arch, str) or not arch:
            raise CheckpointError(f"{source}: no 'architecture' (the timm model name)")
        args = dict(args)
        in_args = args.pop("num_classes", None)  # newer timm repeats it in model_args
        num_classes = _int(cfg.get("num_classes", in_args), "num_classes", source)
        size = pcfg.get("input_size", (3, 224, 224))
        if not (isinstance(size, (list, tuple)) and len(size) == 3):
            raise CheckpointError(f"{source}: input_size must be [C, H, W], got {size!r}")
        input_size = tuple(_int(v, "input_size", source) for v in size)
        in_chans = _int(args.pop("in_chans", input_size[0]), "model_args.in_chans", source)
        labels = cfg.get("label_names", pcfg.get("label_names")) or ()
        if isinstance(labels, Mapping):  # timm allows {index: name} with gaps
            labels = [labels[k] for k in sorted(labels, key=int)]
        return cls(
            architecture=arch,
            model_args=args,
            num_classes=num_classes,
            in_chans=in_chans,
            input_size=(in_chans, input_size[1], input_size[2]),
            mean=_floats(pcfg.get("mean", cls.mean), "mean", source),
            std=_floats(pcfg.get("std", cls.std), "std", source),
            crop_pct=_float(pcfg.get("crop_pct", 0.875), "crop_pct", source),
            crop_mode=_choice(pcfg.get("crop_mode", "center"), "crop_mode", _CROP_MODES, source),
            interpolation=str(pcfg.get("interpolation") or "bilinear"),
            img_mode=str(cfg.get("img_mode") or ("L" if in_chans == 1 else "RGB")),
            label_names=tuple(str(c) for c in labels),
            num_features=None if cfg.get("num_features") is None else int(cfg["num_features"]),
        )

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], source: str) -> ModelDescription | None:
        """The description in a safetensors header (:meth:`to_metadata`), or ``None`` without one.

        Raises:
            CheckpointError: the header has an ``architecture`` but a malformed
                entry (named with ``source``).
        """
        if "architecture" not in meta:
            return None

        def load(key: str, default: Any) -> Any:
            if key not in meta:
                return default
            try:
                return json.loads(meta[key])
            except ValueError:
                raise CheckpointError(
                    f"{source}: safetensors metadata {key!r} is not JSON: {meta[key]!r}"
                ) from None

        args = load("model_args", {})
        if not isinstance(args, Mapping):
            raise CheckpointError(f"{source}: safetensors metadata 'model_args' must be an object")
        cfg = {
            "architecture": meta["architecture"],
            "num_classes": load("num_classes", 1000),
            "num_features": load("num_features", None),
            "label_names": load("label_names", []),
            "img_mode": meta.get("img_mode"),
            "model_args": {**args, "in_chans": load("in_chans", 3)},
            "pretrained_cfg": {
                "input_size": load("input_size", [3, 224, 224]),
                "mean": load("mean", list(cls.mean)),
                "std": load("std", list(cls.std)),
                "crop_pct": load("crop_pct", 0.875),
                "crop_mode": meta.get("crop_mode", "center"),
                "interpolation": meta.get("interpolation", "bilinear"),
            },
        }
        return cls.from_config(cfg, source)

    @classmethod
    def from_timm_args(
        cls,
        arch: str,
        args: Mapping[str, Any],
        state_dict: Mapping[str, Any],
        source: str,
    ) -> ModelDescription:
        """The description of a checkpoint of timm's ``train.py`` (``arch``, ``args``, weights).

        Each field comes from ``args`` (``vars()`` of the saved
        ``argparse.Namespace``: ``model_kwargs``, ``num_classes``, ``in_chans``,
        ``input_size`` / ``img_size``, ``mean``, ``std``, ``crop_pct``,
        ``crop_mode``, ``interpolation``, ``input_img_mode``) where it was set;
        otherwise ``num_classes`` and ``in_chans`` from the shapes of the
        classifier and first convolution in ``state_dict``, and the rest from
        the architecture's timm ``pretrained_cfg`` -- what timm's
        ``resolve_data_config`` would give.

        Raises:
            CheckpointError: ``arch`` is not a registered timm model (named with ``source``).
        """
        import timm

        if not timm.is_model(arch):
            raise CheckpointError(
                f"{source}: architecture {arch!r} (its 'arch' / args.model) is not a registered "
                "timm model; pass --model NAME"
            )
        pcfg = timm.get_pretrained_cfg(arch, allow_unregistered=True)
        defaults: dict[str, Any] = pcfg.to_dict() if pcfg is not None else {}

        def given(key: str) -> Any:
            value = args.get(key)
            return None if value in (None, "", []) else value

        def shape(prefix: str | None, dim: int) -> int | None:
            weight = state_dict.get(f"{prefix}.weight") if prefix else None
            return int(weight.shape[dim]) if getattr(weight, "ndim", 0) > dim else None

        first_conv = defaults.get("first_conv")
        first_conv = first_conv[0] if isinstance(first_conv, (list, tuple)) else first_conv
        classifier = defaults.get("classifier")
        classifier = classifier[0] if isinstance(classifier, (list, tuple)) else classifier
        input_size = given("input_size")
        in_chans = int(
            given("in_chans")
            or (input_size[0] if input_size else None)
            or shape(first_conv, 1)
            or defaults.get("input_size", (3,))[0]
        )
        num_classes = int(
            given("num_classes") or shape(classifier, 0) or defaults.get("num_classes", 1000)
        )
        if input_size:
            size = (in_chans, int(input_size[1]), int(input_size[2]))
        elif given("img_size"):
            side = given("img_size")
            hw = (side, side) if isinstance(side, int) else tuple(side)[-2:]
            size = (in_chans, int(hw[0]), int(hw[1]))
        else:
            size = (in_chans, *(int(v) for v in defaults.get("input_size", (3, 224, 224))[1:]))

        def norm(key: str) -> tuple[float, ...]:
            values = tuple(float(v) for v in (given(key) or defaults.get(key) or ()))
            if in_chans == 1 and len(values) == 3:  # an RGB default for a grayscale model
                values = (sum(values) / 3,)
            return values

        model_args = dict(given("model_kwargs") or {})
        return cls(
            architecture=arch,
            model_args=_plain_args(model_args),
            num_classes=num_classes,
            in_chans=in_chans,
            input_size=size,  # type: ignore[arg-type]
            mean=norm("mean"),
            std=norm("std"),
            crop_pct=float(given("crop_pct") or defaults.get("crop_pct", 0.875)),
            crop_mode=str(given("crop_mode") or defaults.get("crop_mode", "center")),
            interpolation=str(given("interpolation") or defaults.get("interpolation", "bilinear")),
            img_mode=str(given("input_img_mode") or ("L" if in_chans == 1 else "RGB")),
        )

    # -- output -------------------------------------------------------------------------------

    def to_config(self) -> dict[str, Any]:
        """The timm / Hugging Face hub ``config.json`` (keys as timm's ``save_for_hf`` writes)."""
        cfg: dict[str, Any] = {"architecture": self.architecture, "num_classes": self.num_classes}
        if self.num_features is not None:
            cfg["num_features"] = self.num_features
        if self.label_names:
            cfg["label_names"] = list(self.label_names)
        cfg["img_mode"] = self.img_mode
        cfg["model_args"] = {**self.model_args, "in_chans": self.in_chans}
        cfg["pretrained_cfg"] = {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "interpolation": self.interpolation,
            "num_classes": self.num_classes,
        }
        return cfg

    def to_config_bytes(self) -> bytes:
        """:meth:`to_config` as the UTF-8 JSON of a ``config.json`` file."""
        return (json.dumps(self.to_config(), indent=2) + "\n").encode()

    def to_metadata(self) -> dict[str, str]:
        """Flat safetensors header entries (strings; lists and dicts as JSON)."""
        values = {key: getattr(self, key) for key in METADATA_KEYS}  # tuples: JSON lists
        out = {}
        for key, value in values.items():
            if value is None:
                continue
            out[key] = value if isinstance(value, str) else json.dumps(value)
        return out

    def create_kwargs(self) -> dict[str, Any]:
        """Every ``timm.create_model`` kwarg: :attr:`model_args`, ``num_classes``, ``in_chans``."""
        return {**self.model_args, "num_classes": self.num_classes, "in_chans": self.in_chans}

    def data(self) -> dict[str, Any]:
        """The preprocessing as :attr:`acmix.engine.LoadedModel.data` holds it."""
        return dict(
            classes=list(self.label_names) or [str(i) for i in range(self.num_classes)],
            in_chans=self.in_chans,
            img_size=int(self.input_size[-1]),
            mean=list(self.mean),
            std=list(self.std),
            crop_pct=self.crop_pct,
            center_crop=self.crop_mode != "squash",
            interpolation=self.interpolation,
        )

    def summary(self) -> str:
        """One line: architecture, kwargs, classes, input and normalisation."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.model_args.items())
        mean = ", ".join(f"{v:.4g}" for v in self.mean)
        std = ", ".join(f"{v:.4g}" for v in self.std)
        c, h, w = self.input_size
        return (
            f"{self.architecture}({args}) with {self.num_classes} classes, input {c}x{h}x{w} "
            f"(mean {mean}; std {std}; {self.crop_mode} crop {self.crop_pct:g}, "
            f"{self.interpolation})"
        )


# -- validation helpers -----------------------------------------------------------------------


def _plain_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` without num_classes / in_chans, as JSON values (tuples become lists)."""
    clean = {k: v for k, v in args.items() if k not in ("num_classes", "in_chans")}
    return json.loads(json.dumps(clean, default=str))


def _int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{source}: {key} must be an integer >= 1, got {value!r}")
    return value


def _float(value: Any, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{source}: {key} must be a finite number, got {value!r}")
    return float(value)


def _floats(value: Any, key: str, source: str) -> tuple[float, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise CheckpointError(f"{source}: {key} must be a list of numbers, got {value!r}")
    return tuple(_float(v, key, source) for v in value)


def _choice(value: Any, key: str, choices: tuple[str, ...], source: str) -> str:
    if value not in choices:
        raise CheckpointError(f"{source}: {key} must be one of {choices}, got {value!r}")
    return value
