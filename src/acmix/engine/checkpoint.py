"""Crash-safe checkpoints: safetensors weights + a tensors-only training state + a JSON manifest.

A checkpoint at global step ``N`` in ``DIR`` is three files::

    DIR/ckpt-0000000N.safetensors   model weights (loadable by timm / safetensors alone)
    DIR/ckpt-0000000N.state.pt      optimizer, scheduler, scaler, EMA, RNG, epoch, step
    DIR/ckpt-0000000N.json          manifest: sizes and SHA-256 of both, step, metrics, config

and the tags ``DIR/last.json`` / ``DIR/best.json`` are copies of a manifest.
A manifest carries its own checksum (``manifest_sha256``: the SHA-256 of the
file's bytes with that field's value written as 64 zeros), so every file a
checkpoint consists of -- weights, state, manifest, tag -- is verified.
Every file is written by :func:`acmix.utils.io.atomic_write_bytes`: to a
temporary name in ``DIR``, flushed with ``fsync``, read back and checked
against its hash, then renamed over its target with ``os.replace`` (atomic on
POSIX), and the directory is synced. A
tag is rewritten only after its checkpoint's files are complete, so a crash
or a full disk at any moment leaves the previous good ``last`` in place.

Loading verifies the manifest's checksum, then the sizes and hashes of the
files it names, before anything is parsed: a truncated, corrupt or altered
file raises :class:`CheckpointError` naming it. The state file is read with
``torch.load(weights_only=True)`` (tensors and plain containers only), so
loading never unpickles arbitrary objects.

Saving holds an exclusive lock on ``DIR/.lock``
(:func:`acmix.utils.io.exclusive_lock`), so processes saving into one
directory take turns: the choice of file names, the manifest and the tags
are never interleaved. Under the lock each save also tidies the directory:
older step checkpoints beyond ``keep`` are deleted unless a tag points at
them, and so are leftovers of crashed writers (``.*.tmp`` files) and weights
/ state files no manifest or tag refers to (a crash, or a full disk, between
writing them and their manifest). A save that fails removes what it wrote.
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

from acmix.utils.io import CheckpointError, atomic_write_bytes, exclusive_lock

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "atomic_write_bytes",
    "clean_checkpoint_dir",
    "get_rng_state",
    "load_checkpoint",
    "load_weights",
    "manifest_bytes",
    "resolve_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

#: 2: the manifest carries its own checksum (1: it did not; still read, unverified).
FORMAT_VERSION = 2

#: How long a save waits for another process saving into the same directory.
LOCK_TIMEOUT_S = 300.0

_SELF_KEY = "manifest_sha256"
_PLACEHOLDER = "0" * 64


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


def _self_field(digest: str) -> bytes:
    return f'"{_SELF_KEY}": "{digest}"'.encode()


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The bytes of a manifest file: ``manifest`` as JSON with its own checksum filled in.

    The checksum is the SHA-256 of the file with the checksum's value written as
    64 zeros; :func:`load_checkpoint` recomputes it over the bytes as read, so
    a flipped bit anywhere in the file (a key, a digit, the checksum itself)
    is an error, never a silently different value.

    Args:
        manifest: the manifest's entries (any ``manifest_sha256`` is replaced).

    Returns:
        UTF-8 JSON bytes.
    """
    body = {k: v for k, v in manifest.items() if k != _SELF_KEY}
    text = json.dumps({**body, _SELF_KEY: _PLACEHOLDER}, indent=1, sort_keys=True).encode()
    digest = hashlib.sha256(text).hexdigest()
    return text.replace(_self_field(_PLACEHOLDER), _self_field(digest), 1)


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

    Raises:
        OSError: a write failed (e.g. a full disk; the file is named). The
            previous checkpoint and tags are untouched, and the files this
            save had written are removed.
        acmix.utils.io.LockError: another process kept the directory locked
            for :data:`LOCK_TIMEOUT_S` seconds.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    w_bytes = st_save(_cpu_tensors(weights), metadata={"format": "acmix", "step": str(step)})
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    s_bytes = buf.getvalue()
    with exclusive_lock(
        directory / ".lock", what=f"checkpoint directory {directory}", timeout=LOCK_TIMEOUT_S
    ):
        stem = _stem(step)
        k = 0
        while (directory / f"{stem}.json").exists():  # never rewrite files a manifest points at
            k += 1
            stem = f"{_stem(step)}-{k}"
        written: list[Path] = []
        try:
            files = {}
            for kind, suffix, data in (
                ("weights", ".safetensors", w_bytes),
                ("state", ".state.pt", s_bytes),
            ):
                name = stem + suffix
                written.append(directory / name)
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
            text = manifest_bytes(manifest)
            path = directory / f"{stem}.json"
            written.append(path)
            atomic_write_bytes(path, text)
        except BaseException:
            for p in written:  # nothing refers to them yet
                p.unlink(missing_ok=True)
            raise
        for tag in tags:
            atomic_write_bytes(directory / f"{tag}.json", text)
        _prune(directory, keep)
        _clean(directory)
    return path


def _referenced(directory: Path) -> tuple[set[str], set[str]]:
    """``(stems tags point at, every file name a manifest or tag refers to)``."""
    tagged: set[str] = set()
    names: set[str] = set()
    for js in directory.glob("*.json"):
        try:
            files = json.loads(js.read_bytes())["files"]
            refs = [files[kind]["file"] for kind in ("weights", "state")]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        names.update(r for r in refs if isinstance(r, str))
        if not js.name.startswith("ckpt-") and isinstance(refs[0], str):
            tagged.add(refs[0].split(".")[0])
    return tagged, names


def _prune(directory: Path, keep: int) -> None:
    tagged, _ = _referenced(directory)
    stems = sorted({p.name.split(".")[0] for p in directory.glob("ckpt-*.json")}, reverse=True)
    for stem in stems[keep:]:
        if stem in tagged:
            continue
        for suffix in (".json", ".safetensors", ".state.pt"):
            (directory / f"{stem}{suffix}").unlink(missing_ok=True)


def _clean(directory: Path) -> list[Path]:
    """Remove crashed writers' temp files and unreferenced weights / state (lock held)."""
    removed = list(directory.glob(".*.tmp"))  # atomic_write_bytes's temp names
    _, names = _referenced(directory)
    manifests = {p.name.split(".")[0] for p in directory.glob("ckpt-*.json")}
    for pattern in ("ckpt-*.safetensors", "ckpt-*.state.pt"):
        for p in directory.glob(pattern):
            # A manifest that cannot be read still keeps its own stem's files.
            if p.name not in names and p.name.split(".")[0] not in manifests:
                removed.append(p)
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def clean_checkpoint_dir(directory: str | os.PathLike) -> list[Path]:
    """Remove what crashes leave in a checkpoint directory; return the files removed.

    Leftovers are temp files of interrupted writes (``.*.tmp``) and weights /
    state files that no manifest or tag refers to. Checkpoints and tags are
    never touched. Runs under the directory's lock (as :func:`save_checkpoint`
    does after each save), so it never races a save.

    Args:
        directory: a checkpoint directory (nothing happens if it does not exist).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    with exclusive_lock(
        directory / ".lock", what=f"checkpoint directory {directory}", timeout=LOCK_TIMEOUT_S
    ):
        return _clean(directory)


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


def _read_manifest(p: Path) -> dict[str, Any]:
    """Parse and verify a manifest / tag file; every error names ``p``."""
    raw = p.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{p}: not a checkpoint manifest (invalid JSON: {e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "acmix-checkpoint":
        raise CheckpointError(f"{p}: not an acmix checkpoint manifest")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{p}: corrupt manifest (format version {version!r})")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{p}: checkpoint format {version} is newer than this acmix "
            f"({FORMAT_VERSION}); upgrade acmix"
        )
    if version >= 2:  # version 1 manifests carry no checksum of their own
        claimed = manifest.get(_SELF_KEY)
        ok = isinstance(claimed, str) and len(claimed) == 64 and raw.count(_self_field(claimed))
        if ok:
            body = raw.replace(_self_field(claimed), _self_field(_PLACEHOLDER), 1)
            ok = hashlib.sha256(body).hexdigest() == claimed
        if not ok:
            raise CheckpointError(
                f"checkpoint manifest {p} is corrupt: its own checksum ({_SELF_KEY}) "
                "does not match its contents"
            )
    files = manifest.get("files")
    for kind in ("weights", "state"):
        entry = files.get(kind) if isinstance(files, dict) else None
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str)
            and Path(entry["file"]).name == entry["file"]  # a file beside the manifest
        ):
            raise CheckpointError(f"{p}: corrupt manifest (files.{kind} is missing or malformed)")
    return manifest


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
        CheckpointError: missing, truncated or corrupt files (named: the
            manifest or tag itself, the weights, the state), or a state file
            that holds anything but tensors and plain values.
    """
    p = resolve_checkpoint(path)
    if p.suffix == ".safetensors":
        return Checkpoint(_parse_weights(p.read_bytes(), p), None, {}, p)
    manifest = _read_manifest(p)
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
