"""Inference helpers: rebuild a model from a checkpoint, classify image files, export to ONNX."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from torch import nn

from acmix.data import AugConfig, DataBundle, DataConfig
from acmix.data.transforms import build_eval_transform
from acmix.engine.checkpoint import Checkpoint, CheckpointError, load_checkpoint
from acmix.engine.description import ModelDescription
from acmix.utils.checks import record_masked_maps

__all__ = [
    "ExportReport",
    "LoadedModel",
    "eval_data",
    "export_onnx",
    "load_model",
    "predict_images",
    "preprocessing_overrides",
    "read_images",
    "save_described_weights",
]


@dataclass
class LoadedModel:
    """A model ready for inference plus what is known about its inputs.

    Attributes:
        model: the network, in eval mode.
        name: its timm name.
        data: the preprocessing (``classes``, ``in_chans``, ``img_size``,
            ``mean``, ``std``, ``crop_pct``, ``center_crop``, ``interpolation``):
            the checkpoint's, or the model's ``pretrained_cfg`` defaults when
            the checkpoint does not describe itself (or there is none).
        manifest: the checkpoint manifest (``{}`` without one).
        description: the network and preprocessing the weights were saved with
            (``None``: the checkpoint does not say, or there is none).
        kwargs: the ``timm.create_model`` kwargs the model was built with.
        found: one line: what was loaded (file, kind, step, which weights, model).
    """

    model: nn.Module
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    description: ModelDescription | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    found: str = ""


def load_model(
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    ema: bool = False,
) -> LoadedModel:
    """Build the model of a checkpoint (or ``model_name`` with fresh weights) for inference.

    A checkpoint that describes itself (every file acmix writes, timm's
    ``train.py`` checkpoints) needs nothing else: its architecture, kwargs,
    classes, input size and normalisation are used. ``model_name`` and
    ``model_kwargs`` are for files that do not (plain state dicts, older
    ``.safetensors`` files) and override the checkpoint's kwargs key by key.

    Args:
        checkpoint: anything :func:`acmix.engine.checkpoint.resolve_checkpoint`
            accepts, or a :class:`~acmix.engine.checkpoint.Checkpoint` loaded
            already (with the same ``ema``; its files are not read again);
            ``None``: ``model_name`` with its initial weights.
        model_name: timm name; must match the checkpoint's architecture when it has one.
        model_kwargs: ``create_model`` kwargs (``num_classes``, ``in_chans``,
            ``mixer``, ...) over the checkpoint's.
        ema: load the EMA weights (a manifest's ``.ema.safetensors`` or
            older state, timm's ``state_dict_ema``).

    Raises:
        CheckpointError: an unreadable checkpoint, no EMA weights, or weights that do not fit.
        ValueError: no model name known, an unknown one, one other than the
            checkpoint's architecture, or kwargs the model refuses.
    """
    manifest: dict[str, Any] = {}
    weights = None
    desc: ModelDescription | None = None
    found = ""
    if checkpoint is not None:
        if isinstance(checkpoint, Checkpoint):
            ck = checkpoint
        else:
            ck = load_checkpoint(checkpoint, weights_only=True, ema=ema)
        manifest, weights, desc = ck.manifest, ck.weights, ck.description
        found = ck.summary()
        if ema and not ck.weights_are_ema:
            if not ck.ema:
                why = (
                    "the run kept no EMA weights (train.ema_decay)"
                    if ck.kind == "acmix"
                    else "it holds no EMA weights"
                )
                if ck.kind == "safetensors":
                    sibling = ck.path.with_name(
                        ck.path.name.replace(".safetensors", ".ema.safetensors")
                    )
                    why = "it holds the model's weights" + (
                        f"; the EMA weights are {sibling}" if sibling.is_file() else ""
                    )
                raise CheckpointError(f"{ck.path}: no EMA weights to load: {why}")
            weights = ck.ema
            found += ", EMA weights"
        if desc is not None and model_name and model_name != desc.architecture:
            raise ValueError(
                f"--model {model_name} does not match the checkpoint's architecture "
                f"{desc.architecture} ({ck.path}); leave --model out to use the checkpoint's"
            )
        if desc is None and not model_name:
            hint = (
                f" (its 'arch' {ck.arch_hint!r} is not a registered model)" if ck.arch_hint else ""
            )
            raise ValueError(
                f"no model name: {ck.path} does not say which architecture it holds{hint}; "
                "pass --model NAME (and --model-arg KEY=VALUE for its kwargs)"
            )
    name = model_name or (desc.architecture if desc is not None else None)
    if not name:
        raise ValueError("no model name: pass --model NAME or a checkpoint")
    kwargs = desc.create_kwargs() if desc is not None else {}
    kwargs.update(model_kwargs or {})
    try:
        model = timm.create_model(name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        raise ValueError(f"unknown model {name!r}; see `acmix list-models`") from None
    except (TypeError, ValueError) as e:  # a kwarg the model refuses, or a bad value
        raise ValueError(f"cannot build {name!r} with {kwargs}: {e}") from None
    if weights is not None:
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise CheckpointError(
                f"{checkpoint}: weights do not fit {name} {kwargs}: {e}"
            ) from None
    model.eval()
    if desc is not None:
        data = desc.data()
        found += f": {desc.summary()}"
    else:
        pcfg = getattr(model, "pretrained_cfg", {}) or {}
        in_chans = kwargs.get("in_chans", 3)
        data = dict(
            classes=[str(i) for i in range(getattr(model, "num_classes", 0))],
            in_chans=in_chans,
            img_size=int(pcfg.get("input_size", (3, 224, 224))[-1]),
            mean=list(pcfg.get("mean", (0.485, 0.456, 0.406)))[:in_chans],
            std=list(pcfg.get("std", (0.229, 0.224, 0.225)))[:in_chans],
            crop_pct=float(pcfg.get("crop_pct", 0.875)),
            center_crop=True,
            interpolation=pcfg.get("interpolation", "bilinear"),
        )
        if found:
            found += f": {name} {kwargs} (the file does not describe itself: {name}'s "
            found += "default preprocessing)"
    return LoadedModel(model, name, data, manifest, desc, kwargs, found)


def save_described_weights(
    loaded: LoadedModel,
    dst: str | os.PathLike,
    *,
    step: int | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> list[Path]:
    """Write ``loaded``'s weights as a self-describing ``.safetensors`` (+ config.json).

    ``dst`` ending in ``.safetensors``: that file, with the description in its
    header, and ``<dst stem>.config.json`` beside it. Otherwise ``dst`` is a
    folder in the Hugging Face / timm layout: ``dst/model.safetensors`` and
    ``dst/config.json``, which ``timm.create_model("local-dir:DST",
    pretrained=True)`` loads once ``acmix`` is imported. Files are written
    atomically.

    Args:
        loaded: a model from :func:`load_model` (its kwargs and data describe it).
        dst: output file or folder.
        step: recorded in the header when known.
        tensors: the weights to write, as they are (dtype kept); default: the
            model's ``state_dict()``.

    Returns:
        The files written.
    """
    from safetensors.torch import save as st_save

    from acmix.utils.io import atomic_write_bytes

    desc = _description_of(loaded)
    dst = Path(dst)
    if dst.suffix == ".safetensors":
        weights_path = dst
        config_path = dst.with_name(dst.name[: -len(".safetensors")] + ".config.json")
    else:
        weights_path, config_path = dst / "model.safetensors", dst / "config.json"
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "producer": "acmix", "weights": "model", **desc.to_metadata()}
    if step is not None:
        meta["step"] = str(step)
    sd = loaded.model.state_dict() if tensors is None else tensors
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}
    atomic_write_bytes(weights_path, st_save(clean, metadata=meta))
    atomic_write_bytes(config_path, desc.to_config_bytes())
    return [weights_path, config_path]


def _description_of(loaded: LoadedModel) -> ModelDescription:
    """The checkpoint's description, or one from the kwargs and data the model was built with."""
    desc = loaded.description
    if desc is not None and loaded.kwargs == desc.create_kwargs():
        return desc
    d = loaded.data
    kwargs = dict(loaded.kwargs)
    num_classes = int(kwargs.pop("num_classes", getattr(loaded.model, "num_classes", 1000)))
    in_chans = int(kwargs.pop("in_chans", d.get("in_chans", 3)))
    classes = d.get("classes") or []
    return ModelDescription.from_run(
        loaded.name,
        kwargs,
        num_classes,
        in_chans,
        {**d, "classes": classes if len(classes) == num_classes else []},
        num_features=getattr(loaded.model, "num_features", None),
    )


def preprocessing_overrides(loaded: LoadedModel) -> list[tuple[str, Any]]:
    """Config overrides that make a recipe read images as ``loaded``'s checkpoint says.

    For evaluating a checkpoint without its recipe: its input size, and for
    centre-cropped inputs its crop fraction and interpolation. ``[]`` when
    the checkpoint does not describe itself.
    """
    if loaded.description is None:
        return []
    d = loaded.data
    out: list[tuple[str, Any]] = [("data.img_size", int(d["img_size"]))]
    if d.get("interpolation") in ("bilinear", "bicubic", "nearest"):
        out.append(("aug.interpolation", d["interpolation"]))
    if d.get("center_crop", True) and d.get("crop_pct"):
        out.append(("aug.crop_pct", float(d["crop_pct"])))
    return out


def eval_data(loaded: LoadedModel, data: DataConfig, aug: AugConfig) -> DataBundle:
    """The evaluation data for ``loaded``, preprocessed as its checkpoint says.

    :func:`acmix.data.build_data` with the model's channels (image folders are
    read in its mode) and the checkpoint's mean / std / size / crop for image
    folders; the in-memory data sets (Fashion-MNIST, digits) normalise with
    the checkpoint's mean and std too, not with statistics of the data at
    hand. A checkpoint that does not describe itself gets the model's
    ``pretrained_cfg`` for folders and the data's own statistics otherwise.
    """
    from acmix.data import build_data

    d = loaded.data
    in_chans = int(d.get("in_chans", 3))
    if loaded.description is None:
        return build_data(data, aug, getattr(loaded.model, "pretrained_cfg", None), in_chans)
    size = int(d["img_size"])
    model_cfg = {
        "mean": tuple(d["mean"]),
        "std": tuple(d["std"]),
        "input_size": (in_chans, size, size),
        "crop_pct": d.get("crop_pct"),
        "interpolation": d.get("interpolation"),
    }
    bundle = build_data(data, aug, model_cfg, in_chans=in_chans)
    if not bundle.info.get("center_crop", True):  # in-memory: normalised with its own stats
        bundle.val.transform = build_eval_transform(  # type: ignore[attr-defined]
            bundle.img_size,
            tuple(d["mean"]),
            tuple(d["std"]),
            interpolation=aug.interpolation,
            center_crop=False,
        )
        bundle.info.update(mean=list(d["mean"]), std=list(d["std"]))
    return bundle


@torch.no_grad()
def read_images(
    paths: Sequence[str | os.PathLike], loaded: LoadedModel, img_size: int | None = None
) -> torch.Tensor:
    """Image files preprocessed as the checkpoint's data says (its evaluation transform).

    Args:
        paths: image files.
        loaded: from :func:`load_model`; ``loaded.data`` gives size, mean, std,
            crop and interpolation, and ``in_chans`` the mode (1: ``L``, else ``RGB``).
        img_size: side to resize to instead of the checkpoint's.

    Returns:
        A float batch ``(N, C, H, W)`` in the order of ``paths``.

    Raises:
        FileNotFoundError / ValueError: an image is missing or unreadable (named).
    """
    d = loaded.data
    tf = build_eval_transform(
        int(img_size or d["img_size"]),
        tuple(d["mean"]),
        tuple(d["std"]),
        crop_pct=d.get("crop_pct"),
        interpolation=d.get("interpolation", "bilinear"),
        center_crop=bool(d.get("center_crop", True)),
    )
    mode = "L" if int(d["in_chans"]) == 1 else "RGB"
    batch = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
        try:
            with Image.open(p) as im:
                batch.append(tf(im.convert(mode)))
        except (OSError, SyntaxError) as e:
            raise ValueError(f"unreadable image {p}: {e}") from None
    return torch.stack(batch)


def predict_images(
    loaded: LoadedModel, paths: list[str | os.PathLike], topk: int = 5
) -> list[list[tuple[str, float]]]:
    """Top-``k`` (class name, probability) for each image file.

    Images are converted to the model's channels (grey or RGB) and passed
    through the evaluation transform of the checkpoint's data.

    Raises:
        FileNotFoundError / ValueError: an image is missing or unreadable (named),
            or ``topk`` is not a positive integer.
    """
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk must be an integer >= 1, got {topk!r}")
    probs = loaded.model(read_images(paths, loaded)).float().softmax(dim=1)
    classes = list(loaded.data.get("classes") or [])
    k = min(topk, probs.shape[1])
    out = []
    for row in probs:
        val, idx = row.topk(k)
        out.append(
            [
                (classes[i] if i < len(classes) else str(i), float(v))
                for v, i in zip(val, idx.tolist(), strict=True)
            ]
        )
    return out


@dataclass
class ExportReport:
    """Result of :func:`export_onnx`.

    Attributes:
        path: the ONNX file.
        checks: ``(input shape, max |onnxruntime - torch|)`` of each check.
        dynamic_hw: whether height and width are dynamic.
    """

    path: Path
    checks: list[tuple[tuple[int, ...], float]]
    dynamic_hw: bool


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, int, int],
    *,
    dynamic_hw: bool = False,
    opset: int = 17,
    atol: float = 1e-4,
    check: bool = True,
) -> ExportReport:
    """Export ``model`` to ONNX with a dynamic batch (and H x W) and check it with onnxruntime.

    The model is traced (``torch.onnx.export(dynamo=False)``, no ``onnxscript``
    needed) under ``no_grad`` at ``(2, *input_size)``. Checks: onnxruntime
    against PyTorch at batch 2 and 3, and with ``dynamic_hw`` at a second
    size (``H + 8``, ``W + 16``). A model whose trace fixes the spatial size
    fails the second check with a clear error: export it without
    ``dynamic_hw``.

    With dynamic H x W the graph keeps the data-independent choices the model
    made at the traced size. ACmix's ``padding_mode="auto"`` picks masked zero
    padding for maps of at most ``kernel_att // 2`` pixels and reflection
    otherwise, so a traced size at which some map is masked would give a graph
    that is wrong at larger inputs, where the model reflects: such an export
    is refused, naming the smallest traced size at which every map reflects.
    At and above that size the choices are the same at every input size, so
    the graph is valid for every input not smaller than the traced one (other
    size-dependent branches, e.g. Swin's padding to whole windows, are caught
    by the check at the second size).

    Args:
        model: the network (put in eval mode).
        path: output ``.onnx`` file.
        input_size: ``(C, H, W)`` of the trace.
        dynamic_hw: also make height and width dynamic.
        opset: ONNX opset.
        atol: largest allowed ``max |ort - torch|`` relative to ``max |torch|``
            (plus an absolute ``atol``).
        check: run the onnxruntime checks (needs ``onnxruntime``).

    Raises:
        ImportError: ``onnx`` / ``onnxruntime`` missing (the message says how to install).
        ValueError: ``dynamic_hw`` at a traced size where some map is masked (the
            smallest valid traced size is named).
        RuntimeError: onnxruntime disagrees with PyTorch, or returns NaN / inf
            (shape and error named).
    """
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs onnx: pip install 'acmix[export]'") from None
    model = model.eval()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    C, H, W = input_size
    if dynamic_hw:
        _check_dynamic_trace_size(model, C, H, W)
    x = torch.randn(2, C, H, W)
    axes: dict[str, dict[int, str]] = {"input": {0: "batch"}, "logits": {0: "batch"}}
    if dynamic_hw:
        axes["input"].update({2: "height", 3: "width"})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=opset,
        )
    checks: list[tuple[tuple[int, ...], float]] = []
    if check:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(
                "checking the export needs onnxruntime: pip install 'acmix[export]'"
            ) from None
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        shapes = [(2, C, H, W), (3, C, H, W)]
        if dynamic_hw:
            shapes.append((2, C, H + 8, W + 16))
        for shape in shapes:
            xi = torch.randn(*shape)
            ref = model(xi).float()
            try:
                got = torch.from_numpy(sess.run(None, {"input": xi.numpy()})[0])
            except Exception as e:  # onnxruntime raises its own exception types
                raise RuntimeError(f"onnxruntime failed at input {shape}: {e}") from None
            if got.shape != ref.shape:
                raise RuntimeError(
                    f"ONNX output {tuple(got.shape)} != torch {tuple(ref.shape)} at {shape}"
                )
            if not bool(torch.isfinite(got).all()) and bool(torch.isfinite(ref).all()):
                raise RuntimeError(f"onnxruntime returned NaN / inf at input {shape}")
            err = float((got - ref).abs().max())
            checks.append((shape, err))
            if not err <= atol * (1 + float(ref.abs().max())):  # a NaN never passes
                hint = (
                    " (the trace fixed the spatial size: export without dynamic H x W)"
                    if shape[2] != H
                    else ""
                )
                raise RuntimeError(
                    f"ONNX and PyTorch differ at input {shape}: max |diff| {err:.3g}{hint}"
                )
    return ExportReport(path, checks, dynamic_hw)


def _check_dynamic_trace_size(model: nn.Module, C: int, H: int, W: int) -> None:
    """Refuse a dynamic-size trace at which ``"auto"`` padding masks some map."""

    def masked(h: int, w: int) -> list[tuple[int, int, int]]:
        with record_masked_maps() as found:
            model(torch.zeros(1, C, h, w))
        return found

    found = masked(H, W)
    if not found:
        return
    scale = 2
    while scale <= 64 and masked(H * scale, W * scale):
        scale *= 2
    lo, hi = H * scale // 2, H * scale  # masked at lo, none at hi (or give up)
    while hi - lo > 1 and scale <= 64:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if masked(mid, -(-mid * W // H)) else (lo, mid)
    k, h, w = min(found, key=lambda f: f[1] * f[2])
    need = f"trace at {hi}x{-(-hi * W // H)} or larger" if scale <= 64 else "trace larger"
    raise ValueError(
        f"dynamic height / width from a {H}x{W} trace would be wrong at larger inputs: at "
        f"{H}x{W}, {len(found)} attention map(s) are too small for reflection padding "
        f"(the smallest {h}x{w}, window {k}x{k}), so padding_mode='auto' masks them, and "
        "the graph would keep masking where the model reflects. "
        f"{need.capitalize()} (the smallest size at which every map reflects), or export "
        "without dynamic height / width"
    )
