"""``--weights-from``: start a run from trained weights instead of a random initialisation.

Pruning a trained network is how most users meet sparsity (DESIGN.md: "one round from a trained
or fresh network"): a ``contsparse train`` run, a checkpoint of their own, a torchvision-style
ResNet. The weights load into the plain model before any mask attaches, so masks, rewinding and
the dense baseline all see them as the run's initialisation. A run knows its starting weights by
the file's sha256, taken when it is set up: the same file elsewhere is the same run, a file
replaced since is refused rather than mixed into a run that began from the old one.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn

from contsparse.errors import UserError, some_of
from contsparse.experiments.rundir import RunDir, given_file
from contsparse.storage import file_digest, safetensors_header

# Where common training scripts keep the model's state_dict inside a checkpoint dict
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")  # torch.load(weights_only=True)'s refusal


def weights_file(source: str | Path) -> Path:
    """The file ``--weights-from`` names: the file itself, or a finished run's final model."""
    return given_file(source, "--weights-from", RunDir.MODEL)


def weights_digest(source: str | Path) -> str:
    """sha256 of the weights file: what the run records, and checks before it loads them."""
    path = weights_file(source)
    try:
        return file_digest(path)
    except OSError as err:
        raise UserError(f"cannot read --weights-from {path}: {err.strerror or err}") from err


def read_weights(source: str | Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """A state_dict from a safetensors file (contsparse's compressed export included) or a
    ``torch.save`` file read with ``weights_only=True`` (no code runs), told apart by their
    content; taken out of a checkpoint dict, sparse tensors made dense.
    ``expected_sha256``: refuse a file that is no longer the one the run was set up with."""
    path = weights_file(source)
    data = _read(path)
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise UserError(f"--weights-from {path} has changed since this run was set up (sha256 "
                        f"{expected_sha256[:12]}... then, {digest[:12]}... now): put the original file back, give "
                        "--weights-from again to take the new one (a run that has not trained yet: `contsparse "
                        "resume RUN_DIR --weights-from FILE`), or start a new run with another --out")
    state = _from_safetensors(data, path) if _is_safetensors(data) else _from_torch_save(data, path)
    return {key: value.to_dense() if value.layout != torch.strided else value
            for key, value in _state_dict_in(state, path).items()}


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read --weights-from {path}: {err.strerror or err}") from err


def _is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    return len(data) > 8 and data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8


def _from_safetensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    # export/ sits above experiments/, but its compressed format is a leaf module (numpy, safetensors)
    from contsparse.export.compressed import FORMAT_KEY, compressed_from_bytes

    try:
        metadata = safetensors_header(data).get("__metadata__")
        if isinstance(metadata, dict) and FORMAT_KEY in metadata:  # `contsparse export --format compressed`
            return compressed_from_bytes(data, path)  # the bytes whose digest was checked
        return load_safetensors(data)
    except (SafetensorError, ValueError) as err:
        raise UserError(f"--weights-from {path} is a damaged safetensors file ({err})") from err


def _from_torch_save(data: bytes, path: Path) -> object:
    try:
        with warnings.catch_warnings():  # e.g. a pickle protocol it does not expect: the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _UNSAFE_GLOBAL.search(str(err))
        if found is None:  # not a pickle at all, or a damaged one
            raise UserError(f"--weights-from {path} is neither a safetensors nor a torch.save file") from err
        raise UserError(f"--weights-from {path} holds objects other than tensors ({found.group(1)}), which contsparse "
                        "does not unpickle (they could run code): save model.state_dict(), not the model") from err
    except Exception as err:  # the unpickler fails on other files in many ways (IndexError on some text)
        detail = _ANSI.sub("", str(err)).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"--weights-from {path} is neither a safetensors nor a torch.save file ({detail})") from err


def _state_dict_in(state: object, path: Path, within: str = "") -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        names = [key for key in state if not isinstance(key, str)]
        if names:
            raise UserError(f"--weights-from {path} holds tensors keyed by {type(names[0]).__name__}s ({names[0]!r}, "
                            "...), not by parameter names: not a state_dict")
        return state
    if isinstance(state, dict):
        for key in NESTED_KEYS:
            if isinstance(state.get(key), dict):
                if not state[key]:
                    raise UserError(f"--weights-from {path} holds an empty {key!r}{within}: no weights to start from")
                return _state_dict_in(state[key], path, f" (in {key!r})")
        keys = ", ".join(map(str, list(state)[:6])) or "none"
        raise UserError(f"--weights-from {path} holds no state_dict of tensors{within} (its keys: {keys}; a checkpoint "
                        f"keeps one under {', '.join(NESTED_KEYS)})")
    raise UserError(f"--weights-from {path} holds a {type(state).__name__}, not a state_dict")


def load_starting_weights(model: nn.Module, source: str | Path, expected_sha256: str | None = None) -> None:
    """Load ``source``'s weights into the plain ``model`` (no masks attached yet), all of them:
    weights that do not fit are refused with what differs, never loaded in part. A wrapper's
    prefixes are taken off (:func:`_fitting_prefix`); BatchNorm's ``num_batches_tracked`` may be
    missing, as PyTorch itself allows."""
    state = _fitting_prefix(read_weights(source, expected_sha256), model)
    own = model.state_dict()
    shapes = [f"{key} {tuple(value.shape)} (the model's: {tuple(own[key].shape)})" for key, value in state.items()
              if key in own and value.shape != own[key].shape]
    kinds = [f"{key} ({value.dtype})" for key, value in state.items()
             if key in own and own[key].is_floating_point() and not value.is_floating_point()]
    missing = [key for key in own if key not in state and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state if key not in own]
    found = (("other shapes", shapes), ("not floating point", kinds), ("missing", missing),
             ("not in the model", unexpected))
    problems = [f"{what}: {some_of(keys, 4)}" for what, keys in found if keys]
    if problems:
        raise UserError(f"--weights-from {source} does not fit this model ({'; '.join(problems)}): give the weights "
                        "of the same --model, dataset shape and classes")
    broken = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise UserError(f"--weights-from {source} holds NaN or infinite values ({some_of(broken, 4)}): a run that "
                        "diverged?")
    with torch.no_grad():
        model.load_state_dict(state, strict=False)  # every key checked above


def _fitting_prefix(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` without the first name components all its keys share (``module.`` of DDP,
    ``_orig_mod.`` of torch.compile, a wrapper's attribute such as Lightning's ``model.``, nested
    ones too), where that makes them the model's names; else as it is."""
    own, stripped = set(model.state_dict()), state
    while (not set(stripped) & own and all("." in key for key in stripped)
           and len({key.partition(".")[0] for key in stripped}) == 1):
        stripped = {key.partition(".")[2]: value for key, value in stripped.items()}
    return stripped if set(stripped) & own else state
