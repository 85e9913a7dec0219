"""Crash-safe checkpoints: safetensors weights + a tensors-only training state + a JSON manifest.

A checkpoint at global step ``N`` in ``DIR`` is three files::

    DIR/ckpt-0000000N.safetensors   model weights (loadable by timm / safetensors alone)
    DIR/ckpt-0000000N.state.pt      optimizer, scheduler, scaler, EMA, RNG, epoch, step
    DIR/ckpt-0000000N.json          manifest: sizes and SHA-256 of both, step, metrics, config

and the tags ``DIR/last.json`` / ``DIR/best.json`` are copies of a manifest.
Every file is written by :func:`acmix.utils.io.atomic_write_bytes`: to a
temporary name in ``DIR``, flushed with ``fsync``, read back and checked
against its hash, then renamed over its target with ``os.replace`` (atomic on
POSIX), and the directory is synced. A
tag is rewritten only after its checkpoint's files are complete, so a crash
or a full disk at any moment leaves the previous good ``last`` in place.

Loading verifies sizes and hashes before anything is parsed: a truncated or
corrupt file raises :class:`CheckpointError` naming it. The state file is
read with ``torch.load(weights_only=True)`` (tensors and plain containers
only), so loading never unpickles arbitrary objects. Older step checkpoints
beyond ``keep`` are deleted unless a tag points at them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from acmix.utils.io import CheckpointError, atomic_write_bytes

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "atomic_write_bytes",
    "get_rng_state",
    "load_checkpoint",
    "load_weights",
    "resolve_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """A loaded checkpoint.

    Attributes:
        weights: model state dict (``{name: tensor}``).
        state: training state (``None`` when only weights were given).
        manifest: the manifest (``{}`` when only weights were given).
        path: the manifest or weights file it came from.
    """

    weights: dict[str, torch.Tensor]
    state: dict[str, Any] | None
    manifest: dict[str, Any]
    path: Path


# -- RNG state (tensors and plain values only) ------------------------------------------------


def get_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU (and CUDA) RNG states as tensors / plain values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": py_version,
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss": py_gauss,
        },
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`get_rng_state` returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- save ---------------------------------------------------------------------------------------


def _cpu_tensors(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A private contiguous CPU copy of each tensor (safetensors refuses shared storage).
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def _stem(step: int) -> str:
    return f"ckpt-{step:08d}"


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    weights: Mapping[str, torch.Tensor],
    state: Mapping[str, Any],
    *,
    tags: tuple[str, ...] = ("last",),
    keep: int = 2,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint of global step ``step`` and point ``tags`` at it.

    Args:
        directory: checkpoint directory (created if needed).
        step: global optimizer step (names the files).
        weights: model state dict.
        state: training state: tensors, numbers, strings, lists, dicts only.
        tags: tag files to (re)point at this checkpoint (``"last"``, ``"best"``).
        keep: step checkpoints to keep (newest first) besides tagged ones.
        info: extra JSON-serialisable manifest entries (config, metrics, data).

    Returns:
        The manifest path.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = _stem(step)
    k = 0
    while (directory / f"{stem}.json").exists():  # never rewrite files a manifest points at
        k += 1
        stem = f"{_stem(step)}-{k}"
    w_bytes = st_save(_cpu_tensors(weights), metadata={"format": "acmix", "step": str(step)})
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    s_bytes = buf.getvalue()
    files = {}
    for kind, suffix, data in (
        ("weights", ".safetensors", w_bytes),
        ("state", ".state.pt", s_bytes),
    ):
        name = stem + suffix
        files[kind] = {
            "file": name,
            "bytes": len(data),
            "sha256": atomic_write_bytes(directory / name, data),
        }
    manifest = {
        "format": "acmix-checkpoint",
        "version": FORMAT_VERSION,
        "step": int(step),
        "files": files,
        **dict(info or {}),
    }
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    path = directory / f"{stem}.json"
    atomic_write_bytes(path, text)
    for tag in tags:
        atomic_write_bytes(directory / f"{tag}.json", text)
    _prune(directory, keep)
    return path


def _prune(directory: Path, keep: int) -> None:
    tagged = set()
    for tag_file in directory.glob("*.json"):
        if tag_file.name.startswith("ckpt-"):
            continue
        try:
            tagged.add(json.loads(tag_file.read_text())["files"]["weights"]["file"].split(".")[0])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    stems = sorted({p.name.split(".")[0] for p in directory.glob("ckpt-*.json")}, reverse=True)
    for stem in stems[keep:]:
        if stem in tagged:
            continue
        for suffix in (".json", ".safetensors", ".state.pt"):
            (directory / f"{stem}{suffix}").unlink(missing_ok=True)


# -- load ---------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run / checkpoint directory (-> its ``last.json``), a manifest or a weights file."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "last.json", p / "checkpoints" / "last.json"):
            if cand.is_file():
                return cand
        raise CheckpointError(
            f"no checkpoint in {p} (expected {p}/last.json or checkpoints/last.json)"
        )
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    return p


def _read_verified(path: Path, entry: Mapping[str, Any]) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None
    if len(data) != entry["bytes"]:
        raise CheckpointError(
            f"checkpoint file {path} is truncated or altered: {len(data)} bytes, "
            f"the manifest says {entry['bytes']}"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt: its SHA-256 does not match the manifest"
        )
    return data


def _parse_weights(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    try:
        return dict(st_load(data))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Model weights of a checkpoint (manifest / directory: verified) or a ``.safetensors`` file."""
    return load_checkpoint(path, weights_only=True).weights


def load_checkpoint(path: str | os.PathLike, weights_only: bool = False) -> Checkpoint:
    """Load and verify a checkpoint.

    Args:
        path: a run or checkpoint directory (its ``last.json``), a manifest
            ``.json``, or a ``.safetensors`` weights file (no state).
        weights_only: skip the training state.

    Raises:
        CheckpointError: missing, truncated or corrupt files (named), or a
            state file that holds anything but tensors and plain values.
    """
    p = resolve_checkpoint(path)
    if p.suffix == ".safetensors":
        return Checkpoint(_parse_weights(p.read_bytes(), p), None, {}, p)
    try:
        manifest = json.loads(p.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{p}: not a checkpoint manifest (invalid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "acmix-checkpoint":
        raise CheckpointError(f"{p}: not an acmix checkpoint manifest")
    if manifest.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format {manifest['version']} is newer than this acmix "
            f"({FORMAT_VERSION}); upgrade acmix"
        )
    files = manifest["files"]
    w_path = p.parent / files["weights"]["file"]
    weights = _parse_weights(_read_verified(w_path, files["weights"]), w_path)
    state = None
    if not weights_only:
        s_path = p.parent / files["state"]["file"]
        data = _read_verified(s_path, files["state"])
        try:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise CheckpointError(
                f"{s_path}: refusing to load (only tensors and plain values are allowed): {e}"
            ) from None
    return Checkpoint(weights, state, manifest, p)
