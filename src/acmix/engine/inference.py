"""Inference helpers: rebuild a model from a checkpoint, classify image files, export to ONNX."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from PIL import Image
from torch import nn

from acmix.data.transforms import build_eval_transform
from acmix.engine.checkpoint import CheckpointError, load_checkpoint
from acmix.utils.checks import record_masked_maps

__all__ = ["ExportReport", "LoadedModel", "export_onnx", "load_model", "predict_images"]


@dataclass
class LoadedModel:
    """A model ready for inference plus what is known about its inputs.

    Attributes:
        model: the network, in eval mode.
        name: its timm name.
        data: the checkpoint's data description (``classes``, ``in_chans``,
            ``img_size``, ``mean``, ``std``, ``crop_pct``, ``center_crop``,
            ``interpolation``); defaults from the model's ``pretrained_cfg``
            when there is no checkpoint manifest.
        manifest: the checkpoint manifest (``{}`` without one).
    """

    model: nn.Module
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def load_model(
    checkpoint: str | os.PathLike | None = None,
    model_name: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    ema: bool = False,
) -> LoadedModel:
    """Build the model of a checkpoint (or ``model_name`` with fresh weights) for inference.

    Args:
        checkpoint: a run / checkpoint directory, manifest or ``.safetensors``
            file; ``None``: ``model_name`` with its initial weights.
        model_name: timm name; needed for a bare ``.safetensors`` file,
            otherwise taken from the manifest.
        model_kwargs: architecture kwargs (``num_classes``, ``in_chans``,
            ``mixer``, ...); the manifest's are used when present.
        ema: load the EMA weights of the checkpoint's training state.

    Raises:
        CheckpointError: an unreadable checkpoint, or weights that do not fit.
        ValueError: no model name known, an unknown one, or kwargs the model refuses.
    """
    manifest: dict[str, Any] = {}
    weights = None
    if checkpoint is not None:
        ck = load_checkpoint(checkpoint, weights_only=not ema)
        manifest, weights = ck.manifest, ck.weights
        if ema:
            ema_sd = (ck.state or {}).get("ema") or {}
            if not ema_sd:
                raise CheckpointError(f"{ck.path}: the run kept no EMA weights (train.ema_decay)")
            weights = ema_sd
    m = manifest.get("model", {})
    name = model_name or m.get("name")
    if not name:
        raise ValueError("no model name: pass --model NAME for a bare .safetensors file")
    kwargs = dict(m.get("kwargs", {}))
    for key in ("num_classes", "in_chans"):
        if key in m:
            kwargs[key] = m[key]
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
    data = dict(manifest.get("data", {}))
    if not data:
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
    return LoadedModel(model, name, data, manifest)


@torch.no_grad()
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
    d = loaded.data
    tf = build_eval_transform(
        int(d["img_size"]),
        tuple(d["mean"]),
        tuple(d["std"]),
        crop_pct=d.get("crop_pct"),
        interpolation=d.get("interpolation", "bilinear"),
        center_crop=bool(d.get("center_crop", True)),
    )
    mode = "L" if int(d["in_chans"]) == 1 else "RGB"
    batch = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"image not found: {p}")
        try:
            with Image.open(p) as im:
                batch.append(tf(im.convert(mode)))
        except (OSError, SyntaxError) as e:
            raise ValueError(f"unreadable image {p}: {e}") from None
    probs = loaded.model(torch.stack(batch)).float().softmax(dim=1)
    classes = list(d.get("classes") or [])
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
