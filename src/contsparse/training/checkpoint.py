"""Checkpoints as safetensors (all tensors) plus JSON (everything else): nothing in them can run code.

Nested state (model and optimiser ``state_dict``s, RNG state, counters) is split into a flat dict
of tensors and a JSON skeleton that refers to them by key. Writes are atomic: a new checkpoint is
complete on disk before it replaces the old one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from contsparse.errors import UserError

TENSORS, SKELETON = "tensors.safetensors", "state.json"


def flatten(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "t") -> Any:
    """JSON-able skeleton of ``obj``; its tensors are moved into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
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


def save_checkpoint(state: dict[str, Any], directory: Path) -> None:
    """Write ``state`` to ``directory`` atomically (temporary folder, fsync, rename)."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / TENSORS))
    with open(tmp / SKELETON, "w") as handle:
        json.dump(skeleton, handle)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_file(tmp / TENSORS)
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (falls back to the previous one if the
    process died between the two renames)."""
    if not (directory / SKELETON).is_file():
        old = directory.with_name(directory.name + ".old")
        if (old / SKELETON).is_file():
            directory = old
        else:
            raise UserError(f"no checkpoint in {directory}")
    try:
        tensors = load_file(str(directory / TENSORS), device=str(map_location))
        with open(directory / SKELETON) as handle:
            skeleton = json.load(handle)
        return unflatten(skeleton, tensors)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"checkpoint {directory} is damaged ({err}); delete it to restart the run") from err


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
