"""Compressed storage of sparse weights: where the kept entries are, plus their values.

Where they are takes the smaller of two encodings, per tensor. A bitmask: ``1/32`` of a float32
tensor's size whatever its density. Gaps: one byte per kept entry, the number of zeros before it
since the previous one (a gap of 255 or more takes a byte of 255 for each 255 and a last byte
for the rest), about ``d/4`` at a density ``d``: the smaller one below about ``d = 12 %``, so a
ticket with 1.7 % of its weights takes about 2.2 % of the dense size instead of 4.8 %. (CSR
with 32-bit column indices would take ``2d``.) The file is an ordinary safetensors file; its
metadata says which entries are compressed and how, so :func:`load_compressed` restores the
dense ``state_dict`` exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from contsparse.errors import UserError
from contsparse.storage import for_safetensors, safetensors_header, write_atomic

FORMAT_KEY = "contsparse.compressed"
PARTS = ("bitmask", "gaps", "values")  # the stored parts of a compressed tensor, "<name>.<part>"
ORDER_KEY = "contsparse.order"  # the state_dict's key order (safetensors stores tensors sorted)
ENCODINGS = ("bitmask", "gaps")  # where the kept entries are; a layout entry without "encoding": bitmask
ENTRY_BYTES = 160  # about what a compressed tensor's second entry adds to the header and the layout


class UnknownEncoding(ValueError):
    """A layout entry names an encoding this version does not know (a newer writer's, or damage)."""


def compress_state_dict(state: dict[str, torch.Tensor], min_zero_fraction: float = 0.0
                        ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store and metadata: each floating tensor that this makes smaller (a float32 one
    with more than 1/32 zeros; and at least ``min_zero_fraction`` of them) becomes
    ``<name>.values`` (the nonzeros, row-major) and ``<name>.bitmask`` (packed bits) or
    ``<name>.gaps`` (see the module's docstring), whichever is smaller. A tensor whose parts'
    names another entry already has is stored as it is, so no name is ever ambiguous."""
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
        names_free = not any(f"{name}.{part}" in state for part in PARTS)
        kept = int(nonzero.sum()) if tensor.is_floating_point() else tensor.numel()
        size, bitmask = tensor.numel(), (tensor.numel() + 7) // 8
        # the positions take at least a byte per kept entry (gaps) or the bitmask's bytes, and the
        # second entry its place in the header and the layout
        smaller = (kept * tensor.element_size() + min(kept, bitmask) + ENTRY_BYTES) < size * tensor.element_size()
        if tensor.is_floating_point() and size and names_free and smaller and size - kept >= min_zero_fraction * size:
            flat = nonzero.flatten().numpy()
            gaps = _gaps(np.flatnonzero(flat))
            if gaps.size < bitmask:  # "size": what the bitmask's length checked
                tensors[f"{name}.gaps"] = torch.from_numpy(gaps)
                layout[name] = {"shape": list(tensor.shape), "encoding": "gaps", "size": int(flat.size)}
            else:
                tensors[f"{name}.bitmask"] = torch.from_numpy(np.packbits(flat))
                layout[name] = {"shape": list(tensor.shape)}
            tensors[f"{name}.values"] = tensor[nonzero]
        else:
            tensors[name] = tensor
    return tensors, {FORMAT_KEY: json.dumps(layout), ORDER_KEY: json.dumps(list(state))}


def save_compressed(state: dict[str, torch.Tensor], path: str | Path, min_zero_fraction: float = 0.0) -> None:
    write_atomic(Path(path), compressed_bytes(state, min_zero_fraction))


def compressed_bytes(state: dict[str, torch.Tensor], min_zero_fraction: float = 0.0,
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
        data = Path(path).read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err})") from err
    return compressed_from_bytes(data, path)


def compressed_from_bytes(data: bytes, path: str | Path) -> dict[str, torch.Tensor]:
    """:func:`load_compressed` of a file already read (``path`` names it in messages): a caller
    that has checked the bytes' digest loads those very bytes."""
    try:
        metadata = safetensors_header(data).get("__metadata__") or {}
        if not isinstance(metadata, dict) or FORMAT_KEY not in metadata:
            raise UserError(f"{path} is not a contsparse compressed file (no {FORMAT_KEY} metadata)")
        layout = json.loads(metadata[FORMAT_KEY])
        order = json.loads(metadata[ORDER_KEY]) if ORDER_KEY in metadata else None  # older files: none
        stored = load(data)
    except (SafetensorError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise UserError(f"cannot read {path} ({err})") from err
    try:
        return _in_order(_decompress(stored, layout), order)
    except UnknownEncoding as err:
        raise UserError(f"{path}: {err}, which this contsparse cannot read (it reads {', '.join(ENCODINGS)}): "
                        "a file written by a newer contsparse? upgrade to read it") from err
    except (KeyError, ValueError, TypeError, AttributeError, RuntimeError) as err:
        raise UserError(f"{path} is damaged: its compressed tensors do not match their layout "
                        f"({type(err).__name__}: {err})") from err


def _gaps(positions: np.ndarray) -> np.ndarray:
    """The gaps encoding of increasing flat positions (see the module's docstring)."""
    gaps = np.diff(positions, prepend=-1) - 1  # zeros before each kept entry since the previous one
    escapes = gaps // 255
    encoded = np.full(int(escapes.sum()) + gaps.size, 255, dtype=np.uint8)
    encoded[np.cumsum(escapes + 1) - 1] = gaps % 255  # each entry's last byte
    return encoded


def _positions(encoded: np.ndarray) -> np.ndarray:
    """The flat positions the gaps encoding holds: each entry's bytes summed, plus one per entry before it."""
    last = encoded != 255
    return np.cumsum(encoded, dtype=np.int64)[last] + np.arange(int(last.sum()))


def _decompress(stored: dict[str, torch.Tensor], layout: dict) -> dict[str, torch.Tensor]:
    parts = {f"{name}.{info.get('encoding', ENCODINGS[0]) if isinstance(info, dict) else 'bitmask'}"
             for name, info in layout.items()} | {f"{name}.values" for name in layout}
    state = {k: v for k, v in stored.items() if k not in parts}  # a plain "w.gaps" beside a bitmask-coded w stays
    for name, info in layout.items():
        shape = info["shape"]
        if not isinstance(shape, list) or any(type(size) is not int or size < 0 for size in shape):
            raise ValueError(f"{name}: shape {shape!r} is not a list of sizes")
        numel = int(np.prod(shape)) if shape else 1
        encoding = info.get("encoding", "bitmask")  # files written before gaps existed: a bitmask
        if isinstance(encoding, str) and encoding not in ENCODINGS:  # a name: a newer writer's; anything else: damage
            raise UnknownEncoding(f"{name} is stored in the encoding {encoding!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"{name}: encoding {encoding!r} is not a name")
        where = stored[f"{name}.{encoding}"]
        if where.dtype != torch.uint8 or where.dim() != 1:
            raise ValueError(f"{name}.{encoding}: {tuple(where.shape)} {where.dtype}, not a row of bytes")
        if encoding == "bitmask":
            if where.numel() != (numel + 7) // 8:
                raise ValueError(f"{name}.bitmask: {where.numel()} bytes for {numel} bits")
            positions = np.flatnonzero(np.unpackbits(where.numpy(), count=numel))
        else:
            if info.get("size") != numel:
                raise ValueError(f"{name}: shape {shape} does not hold the {info.get('size')!r} entries it was "
                                 "saved with")
            positions = _positions(where.numpy())
            if (positions.size and positions[-1] >= numel) or (where.numel() and where[-1] == 255):
                raise ValueError(f"{name}.gaps: positions beyond the tensor's {numel} entries")
        values = stored[f"{name}.values"]
        if values.dim() != 1 or values.numel() != positions.size:
            raise ValueError(f"{name}.values: {values.numel()} values for {positions.size} nonzeros")
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[torch.from_numpy(positions)] = values
        state[name] = dense.reshape(shape)
    return state


def _in_order(state: dict[str, torch.Tensor], order: list | None) -> dict[str, torch.Tensor]:
    """The entries in the saved ``state_dict``'s order, where the file records it."""
    if order is None:
        return state
    if not isinstance(order, list) or sorted(order) != sorted(state):
        raise ValueError(f"the recorded key order does not name the stored entries ({ORDER_KEY})")
    return {name: state[name] for name in order}
