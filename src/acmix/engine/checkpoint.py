"""Crash-safe checkpoints: safetensors weights + a tensors-only training state + a JSON manifest.

A checkpoint at global step ``N`` in ``DIR`` is up to five files::

    DIR/ckpt-0000000N.safetensors      model weights (loadable by timm / safetensors alone)
    DIR/ckpt-0000000N.ema.safetensors  EMA weights (runs with train.ema_decay)
    DIR/ckpt-0000000N.config.json      timm / Hugging Face hub config of the weights
    DIR/ckpt-0000000N.state.pt         optimizer, scheduler, scaler, RNG, epoch, step
    DIR/ckpt-0000000N.json             manifest: sizes and SHA-256 of the others, step,
                                       metrics, config

and the tags ``DIR/last.json`` / ``DIR/best.json`` are copies of a manifest.
Both weights files carry the model's description
(:class:`~acmix.engine.description.ModelDescription`: architecture, kwargs,
classes, input channels and size, normalisation, crop, interpolation) in
their safetensors header, and the ``.config.json`` holds it in timm's hub
layout, so each file alone rebuilds the network and its preprocessing.
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

:func:`resolve_checkpoint` is the one way every command finds a checkpoint:
a run directory, its ``checkpoints/`` directory, a manifest or tag (with or
without ``.json``), a ``.safetensors`` file, a Hugging Face style folder
(``config.json`` + ``model.safetensors``), or a PyTorch file -- timm's
``train.py`` checkpoints (``.pth.tar``: ``state_dict``, ``state_dict_ema``,
``arch``, ``args``) included, read with ``weights_only=True`` and only
``argparse.Namespace`` allowed besides tensors and plain values.

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

import argparse
import hashlib
import io
import json
import os
import pickle
import random
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from acmix.engine.description import ModelDescription
from acmix.utils.io import (
    CheckpointError,
    atomic_write_bytes,
    exclusive_lock,
    load_checkpoint_file,
    unwrap_state_dict,
)

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "ModelDescription",
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
#: A version 2 manifest may also name ``ema`` and ``config`` files (older acmix ignores them).
FORMAT_VERSION = 2

#: The files of a checkpoint: manifest ``files`` entry -> file name suffix after the stem.
FILE_SUFFIXES: dict[str, str] = {
    "weights": ".safetensors",
    "ema": ".ema.safetensors",
    "config": ".config.json",
    "state": ".state.pt",
}
_REQUIRED = ("weights", "state")

#: PyTorch files a checkpoint may be (timm's train.py writes ``.pth.tar``).
TORCH_SUFFIXES = (".pth", ".pt", ".tar", ".bin", ".ckpt")

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
        description: the network and preprocessing the weights are for
            (``None``: the file does not say; older safetensors files, plain
            state dicts).
        ema: the EMA weights, when asked for and present.
        kind: ``"acmix"`` (a manifest), ``"safetensors"``, ``"timm"`` (a
            ``train.py`` checkpoint) or ``"torch"`` (another PyTorch file).
        weights_are_ema: ``weights`` are EMA weights (a ``.ema.safetensors`` file).
        arch_hint: a name the file gave that is not a registered model (timm's
            ``arch`` without ``args``), for error messages.
    """

    weights: dict[str, torch.Tensor]
    state: dict[str, Any] | None
    manifest: dict[str, Any]
    path: Path
    description: ModelDescription | None = None
    ema: dict[str, torch.Tensor] | None = None
    kind: str = "acmix"
    weights_are_ema: bool = False
    arch_hint: str | None = None

    def summary(self) -> str:
        """One line saying what was found: the file, its kind, step / epoch, which weights."""
        what = {
            "acmix": "acmix checkpoint",
            "safetensors": "safetensors weights",
            "timm": "timm training checkpoint",
            "torch": "PyTorch state dict",
        }[self.kind]
        where = []
        if "step" in self.manifest:
            where.append(f"step {self.manifest['step']}")
        if "epoch" in self.manifest:
            where.append(f"epoch {self.manifest['epoch']}")
        text = f"{what} {self.path}" + (f" ({', '.join(where)})" if where else "")
        if self.weights_are_ema:
            text += ", EMA weights"
        return text


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
    ema: Mapping[str, torch.Tensor] | None = None,
    description: ModelDescription | None = None,
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
        ema: EMA weights, written as their own ``.ema.safetensors`` file.
        description: the network and preprocessing: written into the header
            of both weights files and as the ``.config.json`` (timm's hub layout).

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
    meta = {"format": "pt", "producer": "acmix", "step": str(step)}
    if description is not None:
        meta.update(description.to_metadata())
    blobs = {"weights": st_save(_cpu_tensors(weights), metadata={**meta, "weights": "model"})}
    if ema is not None:
        blobs["ema"] = st_save(_cpu_tensors(ema), metadata={**meta, "weights": "ema"})
    if description is not None:
        blobs["config"] = description.to_config_bytes()
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    blobs["state"] = buf.getvalue()
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
            for kind, data in blobs.items():
                name = stem + FILE_SUFFIXES[kind]
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
        if js.name.endswith(FILE_SUFFIXES["config"]):
            continue
        try:
            files = json.loads(js.read_bytes())["files"]
            refs = [files[kind]["file"] for kind in _REQUIRED]
            refs += [files[kind]["file"] for kind in FILE_SUFFIXES if kind in files]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        names.update(r for r in refs if isinstance(r, str))
        if not js.name.startswith("ckpt-") and isinstance(refs[0], str):
            tagged.add(refs[0].split(".")[0])
    return tagged, names


def _manifest_stems(directory: Path) -> set[str]:
    """Stems of the step manifests ``ckpt-*.json`` (not the ``.config.json`` files)."""
    return {
        p.name[: -len(".json")] for p in directory.glob("ckpt-*.json") if p.name.count(".") == 1
    }


def _prune(directory: Path, keep: int) -> None:
    tagged, _ = _referenced(directory)
    stems = sorted(_manifest_stems(directory), reverse=True)
    for stem in stems[keep:]:
        if stem in tagged:
            continue
        for suffix in (".json", *FILE_SUFFIXES.values()):
            (directory / f"{stem}{suffix}").unlink(missing_ok=True)


def _clean(directory: Path) -> list[Path]:
    """Remove crashed writers' temp files and unreferenced weights / state (lock held)."""
    removed = list(directory.glob(".*.tmp"))  # atomic_write_bytes's temp names
    _, names = _referenced(directory)
    manifests = _manifest_stems(directory)
    for pattern in ("ckpt-*.safetensors", "ckpt-*.state.pt", "ckpt-*.config.json"):
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


_KINDS_HELP = (
    "a run directory, its checkpoints/ directory, a manifest or tag (.json), a .safetensors "
    "file, a folder with config.json + model.safetensors, or a PyTorch file (.pth.tar / .pth / "
    ".pt / .bin: timm's train.py checkpoints, state dicts)"
)


def _is_torch_file(p: Path) -> bool:
    return p.suffix.lower() in TORCH_SUFFIXES


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The one file a checkpoint path names; every command finds checkpoints this way.

    * a run directory -> ``checkpoints/last.json``; a checkpoint directory -> ``last.json``;
      a folder in the Hugging Face / timm layout -> its ``model.safetensors``;
    * a tag or manifest given without ``.json`` (``runs/x/checkpoints/best``) -> that file;
    * a ``ckpt-N.config.json`` -> its manifest ``ckpt-N.json``; a ``config.json`` -> the
      ``model.safetensors`` beside it;
    * a manifest / tag ``.json``, a ``.safetensors`` file or a PyTorch file: itself.

    Raises:
        CheckpointError: nothing there, or nothing that is a checkpoint (the
            message says what was looked for and what the path holds).
    """
    p = Path(path)
    if p.is_dir():
        for cand in (p / "last.json", p / "checkpoints" / "last.json", p / "model.safetensors"):
            if cand.is_file():
                return cand
        found = sorted(
            f.name
            for d in (p, p / "checkpoints")
            if d.is_dir()
            for f in d.iterdir()
            if f.suffix == ".safetensors" or _is_torch_file(f) or _manifest_stems(d) & {f.stem}
        )
        hint = (
            f"; it holds {', '.join(found[:6])}{' ...' if len(found) > 6 else ''}: pass one of them"
            if found
            else ""
        )
        raise CheckpointError(
            f"no checkpoint in {p} (expected {p}/last.json, {p}/checkpoints/last.json or "
            f"{p}/model.safetensors){hint}"
        )
    if not p.exists():
        tag = p.with_name(p.name + ".json")
        if tag.is_file():
            return tag
        raise CheckpointError(f"checkpoint not found: {p} (expected {_KINDS_HELP})")
    if not p.is_file():
        raise CheckpointError(f"{p} is not a file or directory (expected {_KINDS_HELP})")
    name = p.name
    if name.endswith(FILE_SUFFIXES["config"]):
        manifest = p.with_name(name[: -len(FILE_SUFFIXES["config"])] + ".json")
        if manifest.is_file():
            return manifest
        raise CheckpointError(f"{p} is a model config; its manifest {manifest} is missing")
    if name == "config.json" and (p.parent / "model.safetensors").is_file():
        return p.parent / "model.safetensors"
    if name.endswith(FILE_SUFFIXES["state"]):
        raise CheckpointError(
            f"{p} is a training state (optimizer, RNG), not model weights: pass its manifest "
            f"{p.with_name(name[: -len(FILE_SUFFIXES['state'])] + '.json')} or the run directory"
        )
    if p.suffix in (".json", ".safetensors") or _is_torch_file(p):
        return p
    raise CheckpointError(f"{p}: not a checkpoint file type {p.suffix!r} (expected {_KINDS_HELP})")


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
    optional = [k for k in FILE_SUFFIXES if k not in _REQUIRED and isinstance(files, dict)]
    for kind in [*_REQUIRED, *(k for k in optional if k in files)]:
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
    try:  # sorted by name, as safetensors.torch.load_file gives them
        return dict(sorted(st_load(data).items()))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def safetensors_metadata(data: bytes, path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (``{}`` without one).

    Raises:
        CheckpointError: the header is not a safetensors header (names ``path``).
    """
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: not a readable safetensors file (bad __metadata__)")
    return meta


def _parse_config(data: bytes, path: Path) -> ModelDescription:
    """The model description in a config JSON file's bytes (errors name ``path``)."""
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a model config (invalid JSON: {e})") from None
    return ModelDescription.from_config(cfg, str(path))


def _config_beside(p: Path) -> ModelDescription | None:
    """The description beside a ``.safetensors`` file whose header has none, or ``None``.

    ``X.config.json`` beside ``X.safetensors``, or the ``config.json`` of a
    Hugging Face / timm folder (beside ``model.safetensors``; timm's
    ``save_for_hf`` writes one).
    """
    stem = p.name[: -len(".safetensors")]
    for cand in (p.with_name(stem + FILE_SUFFIXES["config"]), p.parent / "config.json"):
        if cand.is_file() and (cand.name != "config.json" or p.name == "model.safetensors"):
            return _parse_config(cand.read_bytes(), cand)
    return None


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Model weights of any checkpoint :func:`resolve_checkpoint` accepts (manifests verified)."""
    return load_checkpoint(path, weights_only=True).weights


def load_checkpoint(
    path: str | os.PathLike, weights_only: bool = False, ema: bool = False
) -> Checkpoint:
    """Load and verify a checkpoint.

    Args:
        path: anything :func:`resolve_checkpoint` accepts: a run or checkpoint
            directory (its ``last.json``), a manifest or tag, a ``.safetensors``
            file, a Hugging Face style folder, or a PyTorch file (timm's
            ``.pth.tar``, a state dict; no training state).
        weights_only: skip the training state.
        ema: also load the EMA weights (:attr:`Checkpoint.ema`; ``None`` when
            the checkpoint has none): a manifest's ``.ema.safetensors`` (older
            checkpoints: the state's ``ema``), timm's ``state_dict_ema``.

    Raises:
        CheckpointError: missing, truncated or corrupt files (named: the
            manifest or tag itself, the weights, the EMA weights, the config,
            the state), a state file that holds anything but tensors and plain
            values, or a PyTorch file with other pickled objects than those
            and ``argparse.Namespace``.
    """
    p = resolve_checkpoint(path)
    if p.suffix == ".safetensors":
        data = p.read_bytes()
        meta = safetensors_metadata(data, p)
        ck = Checkpoint(_parse_weights(data, p), None, {}, p, kind="safetensors")
        ck.description = ModelDescription.from_metadata(meta, str(p)) or _config_beside(p)
        ck.weights_are_ema = meta.get("weights") == "ema"
        if "step" in meta and meta["step"].isdigit():
            ck.manifest = {"step": int(meta["step"])}
        return ck
    if p.suffix != ".json":
        return _load_torch_file(p)
    manifest = _read_manifest(p)
    files = manifest["files"]
    w_path = p.parent / files["weights"]["file"]
    w_data = _read_verified(w_path, files["weights"])
    weights = _parse_weights(w_data, w_path)
    if "config" in files:
        c_path = p.parent / files["config"]["file"]
        description = _parse_config(_read_verified(c_path, files["config"]), c_path)
    else:  # older checkpoints: the manifest's model / data sections
        description = ModelDescription.from_metadata(
            safetensors_metadata(w_data, w_path), str(w_path)
        ) or ModelDescription.from_manifest(manifest)
    state = None
    if not weights_only or (ema and "ema" not in files):
        s_path = p.parent / files["state"]["file"]
        data = _read_verified(s_path, files["state"])
        try:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            raise CheckpointError(
                f"{s_path}: refusing to load (only tensors and plain values are allowed): {e}"
            ) from None
    ema_weights = None
    if ema and "ema" in files:
        e_path = p.parent / files["ema"]["file"]
        ema_weights = _parse_weights(_read_verified(e_path, files["ema"]), e_path)
    elif ema and isinstance(state, dict) and state.get("ema"):
        ema_weights = dict(state["ema"])  # checkpoints before the EMA had its own file
    ck = Checkpoint(weights, state, manifest, p, description, ema_weights)
    if weights_only and ck.state is not None:
        ck.state = None
    return ck


def _load_torch_file(p: Path) -> Checkpoint:
    """A PyTorch file: timm's ``train.py`` checkpoint, a wrapped or a plain state dict."""
    try:
        raw = load_checkpoint_file(p)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{p}: holds a {type(raw).__name__}, expected a state dict or a training "
            "checkpoint (a dict with 'state_dict')"
        )
    wrapped = bool({"state_dict", "model"} & raw.keys())
    try:
        weights = unwrap_state_dict(raw if wrapped else raw.get("model_ema", raw))
        ema_raw = raw.get("state_dict_ema", raw.get("model_ema")) if wrapped else None
        ema = unwrap_state_dict(ema_raw) if isinstance(ema_raw, Mapping) else None
    except ValueError as e:
        raise CheckpointError(f"{p}: {e}") from None
    args = raw.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    args = dict(args) if isinstance(args, Mapping) else {}
    timm_file = "state_dict" in raw and ("arch" in raw or "args" in raw)
    manifest = {"epoch": raw["epoch"]} if isinstance(raw.get("epoch"), int) else {}
    ck = Checkpoint(weights, None, manifest, p, ema=ema, kind="timm" if timm_file else "torch")
    if timm_file:
        import timm

        names = [n for n in (raw.get("arch"), args.get("model")) if isinstance(n, str) and n]
        arch = next((n for n in names if timm.is_model(n)), None)
        if arch is not None:
            ck.description = ModelDescription.from_timm_args(arch, args, weights, str(p))
        elif names:
            ck.arch_hint = names[0]
    return ck
