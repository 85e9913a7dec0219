"""File I/O every layer shares: atomic writes, safe checkpoint reading, state-dict hygiene.

* :func:`atomic_write_bytes`: temp file in the target's directory, ``fsync``,
  read-back check, ``os.replace`` (atomic on POSIX), directory ``fsync``; the
  file gets the mode a plain ``open()`` would give it (``0o666`` less the umask).
* :func:`exclusive_lock`: an advisory ``flock`` on a lock file that records
  its holder (PID, host, command); the kernel drops it when the holder dies,
  so a lock left by a killed process is recovered, never waited for.
* :func:`load_checkpoint_file`: a ``.safetensors`` file, or anything else
  with ``torch.load(weights_only=True)``; no code from the file ever runs.
* :func:`unwrap_state_dict`: a clean ``{key: tensor}`` from a training
  checkpoint (``{'state_dict': ...}`` / ``{'model': ...}``, ``module.`` /
  ``_orig_mod.`` prefixes), and :func:`check_shapes` against a model's.

Every failure to read or fit a checkpoint is the one :class:`CheckpointError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

__all__ = [
    "CheckpointError",
    "LockError",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_shapes",
    "exclusive_lock",
    "load_checkpoint_file",
    "strip_wrapper_prefix",
    "unwrap_checkpoint",
    "unwrap_state_dict",
]


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, not ours or does not fit the model.

    The message names the file. It is both a ``ValueError`` (bad data; what
    :mod:`acmix.models.convert` raised) and a ``RuntimeError`` (what
    :mod:`acmix.engine.checkpoint` raised), so ``except`` clauses written for
    either keep catching it.
    """


class LockError(RuntimeError):
    """A lock another live process holds (the message names the holder and the lock file)."""


# -- atomic files -----------------------------------------------------------------------------


def _umask() -> int:
    """The process's umask (read without changing it where ``/proc`` says it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic read-by-setting, restored at once
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically: temp file + fsync + verify + ``os.replace``.

    Args:
        path: the target file; its directory must exist.
        data: the bytes to write.

    Returns:
        The SHA-256 hex digest of ``data``.

    The temp file is named ``.<name>.<random>.tmp``; a process killed
    mid-write leaves it behind (:func:`acmix.engine.checkpoint.save_checkpoint`
    removes such leftovers from its directory). The file's mode is
    ``0o666 & ~umask``, as for a file made by ``open()`` (not ``mkstemp``'s 0600).

    Raises:
        CheckpointError: the bytes read back differ (the target is untouched).
        OSError: the write failed, e.g. a full disk (the message names ``path``; the
            target is untouched; the temp file is removed).
    """
    path = Path(path)
    digest = hashlib.sha256(data).hexdigest()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != digest:
                raise CheckpointError(f"{tmp}: bytes read back differ from those written")
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8; returns its SHA-256."""
    return atomic_write_bytes(path, text.encode())


# -- locks ------------------------------------------------------------------------------------


def _holder_text(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        return (
            f"PID {info['pid']} on {info['host']} since {info['since']} "
            f"(command: {info['command']})"
        )
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "a process that wrote no holder record"


@contextlib.contextmanager
def exclusive_lock(
    path: str | os.PathLike, *, what: str, timeout: float = 0.0, hint: str = ""
) -> Iterator[dict[str, Any] | None]:
    """Hold an exclusive advisory lock on ``path`` for the ``with`` block.

    The lock is ``flock(LOCK_EX)`` on the file ``path`` (created if needed),
    which records the holder as JSON: PID, host, start time, command line.
    The kernel releases a ``flock`` when its holder exits in any way, ``kill
    -9`` included, so a lock file left by a dead process is simply taken over
    (its record is yielded so the caller can say so). On release the file is
    removed. A process that finds the path replaced under it (the holder
    removed it while it waited) retries on the new file, so two processes
    never both hold it. POSIX only: where ``fcntl`` is missing the block runs
    unlocked.

    Args:
        path: the lock file.
        what: what the lock protects, for the message (``"run directory runs/x"``).
        timeout: seconds to wait for a held lock (0: fail at once).
        hint: appended to the error message (what to do instead).

    Yields:
        The record of a previous holder that died without releasing (a stale
        lock recovered), else ``None``.

    Raises:
        LockError: another live process holds the lock past ``timeout`` (its PID,
            host, start time and command are named).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield None
        return
    path = Path(path)
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = _holder_text(os.pread(fd, 4096, 0))
                        raise LockError(
                            f"{what} is in use: {path} is locked by {holder}"
                            + (f"; {hint}" if hint else "")
                        ) from None
                    time.sleep(0.05)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder removed the file while we waited: lock the new one
    try:
        stale = None
        raw = os.pread(fd, 4096, 0)
        if raw.strip():
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                stale = json.loads(raw.decode())
            if not isinstance(stale, dict):
                stale = {"record": raw.decode(errors="replace")}
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv) or sys.executable,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield stale
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)  # closing drops the flock


# -- reading checkpoints ----------------------------------------------------------------------


def _namespace_allowed() -> contextlib.AbstractContextManager:
    """Let ``torch.load(weights_only=True)`` rebuild ``argparse.Namespace`` (timm's ``args``).

    A ``Namespace`` is a plain attribute holder: unpickling it runs no code of
    the file, and its values are still limited to what ``weights_only`` allows.
    """
    import argparse

    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return safe_globals([argparse.Namespace]) if safe_globals else contextlib.nullcontext()


def load_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """Load a checkpoint without executing code from it.

    ``*.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)`` (tensors and plain containers only, and
    ``argparse.Namespace``: the ``args`` of timm's ``train.py`` checkpoints).

    Args:
        path: the file.

    Returns:
        What the file holds (a state dict or a training checkpoint dict), on CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file cannot be read as a checkpoint (truncated,
            corrupt, not a checkpoint, or holding pickled objects beyond tensors).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device="cpu")
        with _namespace_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint (expected a PyTorch .pth/.pt state dict "
            f"or a .safetensors file; truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e
    except Exception as e:  # pickle.UnpicklingError and friends
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint: {type(e).__name__}: {e}"
        ) from e


_WRAPPER_KEYS = ("state_dict", "model")
_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefix(key: str) -> str:
    """Strip ``module.`` ((Distributed)DataParallel) and ``_orig_mod.`` (torch.compile).

    Args:
        key: a state-dict key.

    Returns:
        ``key`` without any leading wrapper prefixes.
    """
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def unwrap_checkpoint(checkpoint: Any) -> Any:
    """The state dict inside a training checkpoint, unchecked.

    Follows ``{'state_dict': sd, ...}`` / ``{'model': sd, ...}`` as long as the
    entry is a mapping; anything else is returned as it is.

    Args:
        checkpoint: a state dict, a training checkpoint, or anything a file held.

    Returns:
        The innermost wrapped mapping (``checkpoint`` itself when nothing wraps it).
    """
    sd = checkpoint
    while isinstance(sd, Mapping):
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            break
        sd = inner
    return sd


def unwrap_state_dict(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A clean ``{key: tensor}`` state dict from a state dict or a training checkpoint.

    Unwraps ``{'state_dict': sd, ...}`` / ``{'model': sd, ...}`` (the authors'
    ResNet training saves ``{'epoch', 'arch', 'state_dict', 'best_acc1' (a
    tensor), 'optimizer', 'scheduler'}``, their Swin training ``{'model', ...}``;
    a state dict itself never maps those names to a dict) and strips the
    ``module.`` / ``_orig_mod.`` wrapper prefixes, as timm's loader does.

    Args:
        checkpoint: what :func:`load_checkpoint_file` returned.

    Returns:
        The state dict, keys without wrapper prefixes.

    Raises:
        ValueError: the result is empty or holds something other than tensors.
    """
    sd = unwrap_checkpoint(checkpoint)
    if not isinstance(sd, Mapping) or not sd:
        keys = list(checkpoint)[:8] if isinstance(checkpoint, Mapping) else type(checkpoint)
        raise ValueError(
            "not a state dict: expected {name: tensor} or a training checkpoint with a "
            f"'state_dict' or 'model' entry, got {keys}"
        )
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"not a state dict: entries {bad[:8]} are not tensors")
    return {strip_wrapper_prefix(k): v for k, v in sd.items()}


def check_shapes(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    skip: Callable[[str], bool] = lambda key: False,
) -> None:
    """Raise ``ValueError`` naming every key whose shape differs between the two dicts.

    Keys present in only one of them are ignored (``load_state_dict`` reports those).

    Args:
        state_dict: the checkpoint's tensors.
        expected: the model's (``model.state_dict()``; meta tensors are fine).
        skip: keys for which a different shape is allowed (e.g. a new classifier).

    Raises:
        ValueError: one line per wrongly shaped key.
    """
    bad = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and not skip(k) and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if bad:
        raise ValueError(
            f"{len(bad)} checkpoint tensor(s) have the wrong shape for this model "
            "(wrong variant or architecture kwargs?):\n  " + "\n  ".join(bad)
        )
