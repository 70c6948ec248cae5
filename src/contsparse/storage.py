"""Durable file writes, checksums and strict JSON, shared by data loading, checkpoints, run directories
and reports."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in blocks (data files are verified before they are parsed)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_header(data: bytes) -> dict:
    """A safetensors file's JSON header, read from its bytes (8 bytes of its length, little-endian, then the JSON)."""
    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= len(data) - 8:
        raise ValueError("not a safetensors file (no header)")
    header = json.loads(data[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (its header is not a JSON object)")
    return header


def readable_as_new(path: Path) -> None:
    """Give ``path`` the permissions an ordinary new file gets: safetensors writes its files
    readable by their owner alone, which a team's shared run folders, or a cluster's nodes under
    another account, cannot read. Best effort: where the file system refuses modes (FAT), as is."""
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """The process's umask now: from /proc on Linux (reading it otherwise means setting it, which
    another thread could catch in between: that is done once, at import)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def _umask_by_setting() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_by_setting()


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` and make sure it reached the disk before returning."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


# What a failed write raises: safetensors reports one (a full disk) as its own error, not an OSError
WRITE_ERRORS = (OSError, SafetensorError)


def failed_write_reason(err: BaseException) -> str:
    """Why a write failed, in a few words."""
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
        return "the disk is full"
    return getattr(err, "strerror", None) or str(err)


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """``with replaced_atomically(path) as tmp:`` write ``tmp`` (and sync it); on success it replaces
    ``path`` in one rename, so a crash or a failed write (a full disk) leaves either the old or the
    new file whole, never half of one; on failure ``tmp`` is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        readable_as_new(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file whole."""
    with replaced_atomically(path) as tmp:
        write_synced(tmp, data)


def file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s parent folders that is a file, which stops writing ``path``; or None."""
    return next((parent for parent in Path(path).parents if parent.exists() and not parent.is_dir()), None)


def missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parent folders that do not exist yet, innermost first: what
    ``path.mkdir(parents=True)`` makes, and :func:`remove_empty_folders` takes away again."""
    return [folder for folder in (path, *path.parents) if not folder.exists()]


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (innermost first) where they are still empty; a folder something else
    claimed meanwhile, or a file system that refuses, is left as it is."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Persist a rename: on POSIX the directory entry is only durable once its folder is synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def for_safetensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of ``tensors`` that share no memory, as safetensors requires: the
    ``state_dict`` of a model with tied weights holds one tensor under several keys, and each key
    gets its own copy, so that a plain ``load_state_dict`` reads the file back."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[key] = tensor
    return out


def strict_json(value: Any, indent: int | None = None) -> str:
    """JSON text with NaN and infinities as null: strict readers (JavaScript's ``JSON.parse``,
    ``jq``) refuse the bare ``NaN`` Python writes for a diverged run's accuracy."""
    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {k: finite(v) for k, v in item.items()}
        if isinstance(item, list | tuple):
            return [finite(v) for v in item]
        return item
    return json.dumps(finite(value), indent=indent, allow_nan=False)
