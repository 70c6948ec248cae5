"""Compressed storage of sparse weights: a bitmask of the kept entries plus their values.

For a float32 tensor with a fraction ``d`` of nonzeros this takes ``1/32 + d`` of the dense size;
CSR with 32-bit column indices would take ``2d`` plus row pointers, so the bitmask is the smaller
one above ``d = 1/32`` (3 %), where lottery tickets live.
The file is an ordinary safetensors file; its metadata says which entries are compressed, so
:func:`load_compressed` restores the dense ``state_dict`` exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from contsparse.errors import UserError
from contsparse.storage import for_safetensors, write_atomic

FORMAT_KEY = "contsparse.compressed"
ORDER_KEY = "contsparse.order"  # the state_dict's key order (safetensors stores tensors sorted)


def compress_state_dict(state: dict[str, torch.Tensor], min_zero_fraction: float = 0.5
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store and metadata: floating tensors with at least ``min_zero_fraction`` zeros
    become ``<name>.bitmask`` (packed bits, row-major) and ``<name>.values`` (the nonzeros). A
    tensor whose parts' names another entry already has is stored as it is, so no name is ever
    ambiguous."""
    not_tensors = [name for name, value in state.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:  # e.g. a masked model's "<layer>.weight_cs_mask._extra_state"
        raise ValueError(f"only tensors can be stored, not {', '.join(not_tensors[:3])}"
                         + (" (a model with CS masks attached: call masks.make_permanent() first)"
                            if any(name.endswith("_extra_state") for name in not_tensors) else ""))
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        nonzero = tensor != 0
        names_free = f"{name}.bitmask" not in state and f"{name}.values" not in state
        if tensor.is_floating_point() and tensor.numel() and names_free \
                and 1 - nonzero.float().mean().item() >= min_zero_fraction:
            bits = np.packbits(nonzero.flatten().numpy())
            tensors[f"{name}.bitmask"] = torch.from_numpy(bits)
            tensors[f"{name}.values"] = tensor[nonzero]
            layout[name] = {"shape": list(tensor.shape)}
        else:
            tensors[name] = tensor
    return tensors, {FORMAT_KEY: json.dumps(layout), ORDER_KEY: json.dumps(list(state))}


def save_compressed(state: dict[str, torch.Tensor], path: str | Path, min_zero_fraction: float = 0.5) -> None:
    write_atomic(Path(path), compressed_bytes(state, min_zero_fraction))


def compressed_bytes(state: dict[str, torch.Tensor], min_zero_fraction: float = 0.5,
                     extra_metadata: dict[str, str] | None = None) -> bytes:
    """The file :func:`save_compressed` writes, in memory; ``extra_metadata`` (the architecture,
    the input preprocessing) goes into the safetensors header beside the layout."""
    tensors, metadata = compress_state_dict(state, min_zero_fraction)
    if extra_metadata and FORMAT_KEY in extra_metadata:
        raise ValueError(f"{FORMAT_KEY} is the layout's own metadata key")
    return save(for_safetensors(tensors), metadata={**(extra_metadata or {}), **metadata})


def load_compressed(path: str | Path) -> dict[str, torch.Tensor]:
    """The dense ``state_dict`` stored by :func:`save_compressed` (loads without contsparse too,
    with numpy alone: the README's export section says how)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if FORMAT_KEY not in metadata:
                raise UserError(f"{path} is not a contsparse compressed file (no {FORMAT_KEY} metadata)")
            layout = json.loads(metadata[FORMAT_KEY])
            order = json.loads(metadata[ORDER_KEY]) if ORDER_KEY in metadata else None  # older files: none
            stored = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except (OSError, SafetensorError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} ({err})") from err
    try:
        return _in_order(_decompress(stored, layout), order)
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise UserError(f"{path} is damaged: its compressed tensors do not match their layout "
                        f"({type(err).__name__}: {err})") from err


def _decompress(stored: dict[str, torch.Tensor], layout: dict) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in stored.items() if not any(k == f"{n}.bitmask" or k == f"{n}.values" for n in layout)}
    for name, info in layout.items():
        shape = info["shape"]
        if not isinstance(shape, list) or any(type(size) is not int or size < 0 for size in shape):
            raise ValueError(f"{name}: shape {shape!r} is not a list of sizes")
        numel = int(np.prod(shape)) if shape else 1
        bitmask = stored[f"{name}.bitmask"]
        if bitmask.dtype != torch.uint8 or bitmask.dim() != 1 or bitmask.numel() != (numel + 7) // 8:
            raise ValueError(f"{name}.bitmask: {tuple(bitmask.shape)} {bitmask.dtype} for {numel} bits")
        keep = torch.from_numpy(np.unpackbits(bitmask.numpy(), count=numel).astype(bool))
        values = stored[f"{name}.values"]
        if values.dim() != 1 or values.numel() != int(keep.sum()):
            raise ValueError(f"{name}.values: {values.numel()} values for {int(keep.sum())} nonzeros")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[keep] = values
        state[name] = dense.reshape(shape)
    return state


def _in_order(state: dict[str, torch.Tensor], order: list | None) -> dict[str, torch.Tensor]:
    """The entries in the saved ``state_dict``'s order, where the file records it."""
    if order is None:
        return state
    if not isinstance(order, list) or sorted(order) != sorted(state):
        raise ValueError(f"the recorded key order does not name the stored entries ({ORDER_KEY})")
    return {name: state[name] for name in order}
