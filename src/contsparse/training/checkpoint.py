"""Checkpoints as safetensors (all tensors) plus JSON (everything else): nothing in them can run code.

Nested state (model and optimiser ``state_dict``s, RNG states, counters) is split into a flat dict
of tensors and a JSON skeleton that refers to them by key. A checkpoint is a folder holding both
files and a manifest of their SHA-256 digests, checked on load. Writes are crash-safe: the new
checkpoint is written to a temporary folder, fsynced and renamed into place, and the previous one
is kept (``<name>.prev``) so that a damaged latest checkpoint still leaves a good one to resume from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from contsparse import faults
from contsparse.errors import UserError
from contsparse.storage import (
    WRITE_ERRORS,
    failed_write_reason,
    file_digest,
    for_safetensors,
    fsync_dir,
    fsync_file,
    readable_as_new,
    write_synced,
)

TENSORS, SKELETON, MANIFEST = "tensors.safetensors", "state.json", "manifest.json"
FORMAT = 1


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """JSON-able skeleton of ``obj``; its tensors are moved into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj  # save_checkpoint stores for_safetensors' contiguous CPU copies
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: flatten(v, tensors, prefix) for k, v in obj.items()}
        return {"__items__": [[k, flatten(v, tensors, prefix)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, prefix) for v in obj]}
    if isinstance(obj, list):
        return [flatten(v, tensors, prefix) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__items__" in skeleton:
            return {k: unflatten(v, tensors) for k, v in skeleton["__items__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def previous(directory: Path) -> Path:
    """Where the checkpoint before the latest one is kept."""
    return directory.with_name(directory.name + ".prev")


def has_checkpoint(directory: Path) -> bool:
    return any((d / MANIFEST).is_file() for d in (directory, previous(directory)))


def save_checkpoint(state: dict[str, Any], directory: Path) -> None:
    """Write ``state`` to ``directory`` crash-safely; a failed write (disk full, ...) is a
    :class:`UserError` and leaves the previous checkpoint intact."""
    tmp = directory.with_name(directory.name + ".tmp")
    try:
        tensors: dict[str, torch.Tensor] = {}
        skeleton = json.dumps(flatten(state, tensors)).encode()
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(for_safetensors(tensors), str(tmp / TENSORS))
        readable_as_new(tmp / TENSORS)
        fsync_file(tmp / TENSORS)
        write_synced(tmp / SKELETON, skeleton)
        manifest = {"format": FORMAT, "sha256": {name: file_digest(tmp / name) for name in (TENSORS, SKELETON)}}
        write_synced(tmp / MANIFEST, json.dumps(manifest).encode())
        # latest -> .prev, then .tmp -> latest; a crash in between leaves .prev (and .tmp) whole.
        prev = previous(directory)
        if directory.exists():
            shutil.rmtree(prev, ignore_errors=True)
            directory.rename(prev)
        faults.inject(f"rename:{faults.count('checkpoint')}")
        tmp.rename(directory)
        fsync_dir(directory.parent)
    except WRITE_ERRORS as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = failed_write_reason(err)
        raise UserError(f"could not write the checkpoint in {directory.parent} ({reason}); the previous "
                        "checkpoint is intact: fix that and run the same command again to resume") from err


def load_checkpoint(directory: Path, map_location: str | torch.device = "cpu",
                    warn: Any = None, set_aside_damaged: bool = False) -> dict[str, Any]:
    """Read the latest good checkpoint: ``directory``, else the previous one (``warn`` is told why).

    ``set_aside_damaged`` (when resuming): a damaged latest checkpoint is renamed ``<name>.damaged``
    once the previous one has loaded, so that the next save does not rotate it into the place of
    the only good checkpoint."""
    problems = []
    for candidate in (directory, previous(directory)):
        if not (candidate / MANIFEST).is_file():
            if candidate.exists():
                problems.append(f"{candidate.name}: incomplete (no {MANIFEST})")
            continue
        try:
            state = _read_verified(candidate, map_location)
        except _Damaged as err:
            problems.append(f"{candidate.name}: {err}")
            continue
        if problems and warn is not None:
            warn(f"checkpoint damaged ({'; '.join(problems)}); resuming from the previous one in {candidate}")
        if problems and set_aside_damaged and candidate != directory and directory.exists():
            damaged = directory.with_name(directory.name + ".damaged")
            shutil.rmtree(damaged, ignore_errors=True)
            directory.rename(damaged)
        return state
    detail = "; ".join(problems) or "none found"
    raise UserError(f"no usable checkpoint in {directory.parent} ({detail}); delete {directory}* to restart "
                    "the run from scratch")


def read_checkpoint_entry(directory: Path, key: str) -> Any:
    """``state[key]`` of the latest checkpoint whose small JSON part is intact, without reading
    its tensors (for a check before a run starts); None when there is none, or no such entry."""
    for candidate in (directory, previous(directory)):
        try:
            manifest = json.loads((candidate / MANIFEST).read_text())
            if file_digest(candidate / SKELETON) != manifest["sha256"][SKELETON]:
                continue
            entry = json.loads((candidate / SKELETON).read_text()).get(key)
            return None if entry is None else unflatten(entry, {})  # a tensor in it: KeyError, no entry
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


class _Damaged(Exception):
    pass


def _read_verified(directory: Path, map_location: str | torch.device) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        expected = manifest["sha256"]
        for name in (TENSORS, SKELETON):
            if file_digest(directory / name) != expected[name]:
                raise _Damaged(f"{name} does not match its checksum (truncated or modified)")
        tensors = load_file(str(directory / TENSORS), device=str(map_location))
        skeleton = json.loads((directory / SKELETON).read_text())
        return unflatten(skeleton, tensors)
    except _Damaged:
        raise
    except Exception as err:  # any failure to parse means the file is not a good checkpoint
        raise _Damaged(f"unreadable ({type(err).__name__}: {err})") from err
