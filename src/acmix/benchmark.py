"""Side-by-side layer benchmarks: our ACmix vs the reference path vs ``nn.Conv2d``.

Every number is measured in the same process and reported as a ratio to
``nn.Conv2d(C, C, 3, padding=1)`` at the same shape, because absolute times
on shared machines are noisy (malloc settings alone moved attention timings
by 2x on the development machines). The environment is printed with the
table. Used by ``benchmarks/bench_layer.py`` and the ``acmix bench`` command.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from acmix.analysis.memory import peak_memory
from acmix.analysis.timing import time_fn
from acmix.layers import ACmix

__all__ = [
    "LAYER_SHAPES",
    "TARGETS",
    "LayerResult",
    "bench_layers",
    "check_targets",
    "environment",
    "environment_line",
    "format_layer_table",
    "time_fn",
    "tune_allocator",
]

# (C, H, stride): the paper's ResNet stage widths at 224 input, plus a stride-2 case.
LAYER_SHAPES: tuple[tuple[int, int, int], ...] = (
    (64, 56, 1),
    (128, 28, 1),
    (256, 14, 1),
    (512, 7, 1),
    (128, 56, 2),
)

_ENV_KEYS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "LD_PRELOAD",
    "OPENBLAS_CORETYPE",
)


_ALLOCATOR = {"malloc": "default"}


def tune_allocator() -> str:
    """Keep freed memory in the process (glibc ``mallopt``); returns what was set.

    glibc returns large freed blocks to the OS and the next allocation of the
    same size page-faults them back in, a cost that swamps the arithmetic of a
    single layer on VMs (measured here: a 3x3 conv at C=64, 56x56, batch 8
    took 9.5 ms by default, 4.1 ms with the blocks kept). Raising the mmap and
    trim thresholds keeps them, as jemalloc / tcmalloc do and PyTorch's CPU
    performance guides recommend. Both sides of every comparison run under the
    same setting, and the environment line says which.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        ok = False
    _ALLOCATOR["malloc"] = "glibc mmap/trim threshold 1 GiB" if ok else "default (mallopt failed)"
    return _ALLOCATOR["malloc"]


def environment() -> dict[str, object]:
    """What the numbers depend on: versions, threads, device, allocator settings."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    env: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "malloc": _ALLOCATOR["malloc"],
    }
    env.update({k: os.environ[k] for k in _ENV_KEYS if k in os.environ})
    return env


def environment_line() -> str:
    """:func:`environment` as the one-line header printed above every table."""
    return "environment: " + ", ".join(f"{k}={v}" for k, v in environment().items())


@dataclass
class LayerResult:
    """Timings (seconds) and peak extra memory (bytes) of one layer at one shape."""

    name: str
    channels: int
    size: int
    stride: int
    fwd_s: float
    fwd_bwd_s: float
    fwd_bwd_peak_bytes: int
    fwd_peak_bytes: int
    extra: dict[str, float] = field(default_factory=dict)


def _measure(
    name: str,
    layer: nn.Module,
    x: torch.Tensor,
    shape: tuple[int, int, int],
    device: torch.device,
    min_time: float,
) -> LayerResult:
    layer.train()

    def fwd() -> None:
        with torch.no_grad():
            layer(x)

    def fwd_bwd() -> None:
        xg = x.detach().requires_grad_(True)
        layer(xg).sum().backward()
        layer.zero_grad(set_to_none=True)

    t_fwd = time_fn(fwd, device, min_time=min_time)
    t_fb = time_fn(fwd_bwd, device, min_time=min_time)
    peak_fb = peak_memory(fwd_bwd, device)
    peak_f = peak_memory(fwd, device)
    C, H, s = shape
    return LayerResult(name, C, H, s, t_fwd, t_fb, peak_fb, peak_f)


def bench_layers(
    shapes: tuple[tuple[int, int, int], ...] = LAYER_SHAPES,
    *,
    batch: int = 8,
    device: str | torch.device = "cpu",
    include_reference: bool = True,
    min_time: float = 0.5,
    progress: bool = True,
) -> list[LayerResult]:
    """Benchmark ``nn.Conv2d`` 3x3, our ACmix and (optionally) the reference path.

    Args:
        shapes: ``(C, H, stride)`` triples; input ``(batch, C, H, H)``.
        batch: batch size.
        device: where to run.
        include_reference: also time the unfold reference path (slow, memory hungry).
        min_time: seconds of timed calls per measurement (at least 3 calls).
        progress: print a line per measurement to stderr.

    Returns:
        One :class:`LayerResult` per (layer, shape).
    """
    import sys

    device = torch.device(device)
    results: list[LayerResult] = []
    for C, H, s in shapes:
        x = torch.randn(batch, C, H, H, device=device)
        layers: dict[str, nn.Module] = {
            "conv2d": nn.Conv2d(C, C, 3, stride=s, padding=1),
            "acmix": ACmix(C, C, 7, 4, 3, s),
        }
        if include_reference:
            layers["reference"] = ACmix(C, C, 7, 4, 3, s, backend="reference")
        for name, layer in layers.items():
            if progress:
                print(f"  {name:<10} C={C:<4} H={H:<3} stride={s}", file=sys.stderr, flush=True)
            layer.to(device)
            results.append(_measure(name, layer, x, (C, H, s), device, min_time))
    return results


def format_layer_table(results: list[LayerResult]) -> str:
    """Markdown table: ms and MiB per layer, and ratios to ``nn.Conv2d`` at the same shape."""
    base = {(r.channels, r.size, r.stride): r for r in results if r.name == "conv2d"}
    lines = [
        "| layer | C | H | stride | fwd ms | fwd× | fwd+bwd ms | fwd+bwd× "
        "| peak fwd+bwd MiB | mem× |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        b = base[(r.channels, r.size, r.stride)]
        lines.append(
            f"| {r.name} | {r.channels} | {r.size} | {r.stride} | {r.fwd_s * 1e3:.1f} "
            f"| {r.fwd_s / b.fwd_s:.2f} | {r.fwd_bwd_s * 1e3:.1f} "
            f"| {r.fwd_bwd_s / b.fwd_bwd_s:.2f} "
            f"| {r.fwd_bwd_peak_bytes / 2**20:.1f} "
            f"| {r.fwd_bwd_peak_bytes / max(b.fwd_bwd_peak_bytes, 1):.2f} |"
        )
    return "\n".join(lines)


def results_json(results: list[LayerResult]) -> str:
    """The results and the environment as JSON."""
    return json.dumps(
        {"environment": environment(), "results": [asdict(r) for r in results]}, indent=2
    )


# ------------------------------------------------------------------ models


@dataclass
class ModelResult:
    """Train-step and inference timings (seconds) and peak extra memory (bytes) of one model."""

    name: str
    batch: int
    img_size: int
    train_step_s: float
    infer_s: float
    train_peak_bytes: int


def _model_pairs() -> list[tuple[str, Callable[[], nn.Module], str, Callable[[], nn.Module]]]:
    import timm
    import torchvision

    return [
        (
            "acmix_resnet50",
            lambda: timm.create_model("acmix_resnet50"),
            "torchvision resnet50",
            lambda: torchvision.models.resnet50(),
        ),
        (
            "acmix_swin_tiny_patch4_window7_224",
            lambda: timm.create_model("acmix_swin_tiny_patch4_window7_224"),
            "timm swin_tiny_patch4_window7_224",
            lambda: timm.create_model("swin_tiny_patch4_window7_224"),
        ),
    ]


def _measure_model(
    name: str, model: nn.Module, batch: int, img: int, device: torch.device, min_time: float
) -> ModelResult:
    model.to(device)
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    t_train = time_fn(step, device, warmup=1, min_reps=2, min_time=min_time)
    t_infer = time_fn(infer, device, warmup=1, min_reps=2, min_time=min_time)
    peak = peak_memory(step, device)
    return ModelResult(name, batch, img, t_train, t_infer, peak)


def bench_models(
    *,
    batch: int = 8,
    img_size: int = 224,
    device: str | torch.device = "cpu",
    min_time: float = 1.0,
    only: str | None = None,
) -> list[tuple[ModelResult, ModelResult]]:
    """Train step (fwd + bwd + SGD) and inference of our models vs their plain counterparts.

    Returns:
        ``(ours, baseline)`` pairs: acmix_resnet50 vs torchvision resnet50,
        ACmix Swin-T vs timm Swin-T.
    """
    import sys

    device = torch.device(device)
    out = []
    for name, make, base_name, make_base in _model_pairs():
        if only and only not in name:
            continue
        print(f"  {name} vs {base_name}", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        ours = _measure_model(name, make(), batch, img_size, device, min_time)
        base = _measure_model(base_name, make_base(), batch, img_size, device, min_time)
        out.append((ours, base))
    return out


def format_model_table(pairs: list[tuple[ModelResult, ModelResult]]) -> str:
    """Markdown table with ratios ours / baseline."""
    lines = [
        "| model | baseline | batch | train step s | ×base | inference s | ×base "
        "| train peak MiB | ×base |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for o, b in pairs:
        lines.append(
            f"| {o.name} | {b.name} | {o.batch} | {o.train_step_s:.3f} "
            f"| {o.train_step_s / b.train_step_s:.2f} | {o.infer_s:.3f} "
            f"| {o.infer_s / b.infer_s:.2f} | {o.train_peak_bytes / 2**20:.0f} "
            f"| {o.train_peak_bytes / max(b.train_peak_bytes, 1):.2f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ targets

#: The "must reach" ratios of the performance issue: (what, limit).
TARGETS: dict[str, float] = {
    "layer fwd+bwd": 2.0,
    "layer peak memory": 4.0,
    "layer fwd": 1.5,
    "acmix_resnet50 train step": 1.5,
    "acmix_resnet50 train peak memory": 1.5,
    "acmix_swin_tiny_patch4_window7_224 train step": 1.2,
    "acmix_swin_tiny_patch4_window7_224 inference": 1.15,
}


def check_targets(
    layers: list[LayerResult], models: list[tuple[ModelResult, ModelResult]] | None = None
) -> list[tuple[str, float, float, bool]]:
    """Each measured ratio against its target: ``(what, ratio, limit, met)``."""
    rows: list[tuple[str, float, float, bool]] = []
    base = {(r.channels, r.size, r.stride): r for r in layers if r.name == "conv2d"}
    for r in layers:
        if r.name != "acmix":
            continue
        b = base[(r.channels, r.size, r.stride)]
        shape = f"C={r.channels} H={r.size} s={r.stride}"
        for what, ratio in (
            ("layer fwd+bwd", r.fwd_bwd_s / b.fwd_bwd_s),
            ("layer peak memory", r.fwd_bwd_peak_bytes / max(b.fwd_bwd_peak_bytes, 1)),
            ("layer fwd", r.fwd_s / b.fwd_s),
        ):
            limit = TARGETS[what]
            rows.append((f"{what} ({shape})", ratio, limit, ratio <= limit))
    for o, b in models or []:
        for what, ratio in (
            (f"{o.name} train step", o.train_step_s / b.train_step_s),
            (f"{o.name} train peak memory", o.train_peak_bytes / max(b.train_peak_bytes, 1)),
            (f"{o.name} inference", o.infer_s / b.infer_s),
        ):
            if what in TARGETS:
                rows.append((what, ratio, TARGETS[what], ratio <= TARGETS[what]))
    return rows


def format_targets(rows: list[tuple[str, float, float, bool]]) -> str:
    """Markdown table of :func:`check_targets`."""
    lines = ["| target | measured × | must reach × | met |", "|---|---|---|---|"]
    for what, ratio, limit, met in rows:
        lines.append(f"| {what} | {ratio:.2f} | {limit:.2f} | {'yes' if met else 'no'} |")
    return "\n".join(lines)


def machine_name(device: str | torch.device = "cpu") -> str:
    """A file-name slug for the results: device, threads and CPU / GPU model."""
    env = environment()
    device = torch.device(device)
    model = str(env["cuda"] if device.type == "cuda" else env["cpu"])
    slug = "".join(c if c.isalnum() else "_" for c in model.lower()).strip("_")
    while "__" in slug:
        slug = slug.replace("__", "_")
    if device.type == "cuda":
        return f"gpu_{slug}"
    return f"cpu_{env['threads']}thread_{slug}"
