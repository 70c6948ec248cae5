"""``--weights-from``: start a run from trained weights instead of a random initialisation.

Pruning a trained network is how most users meet sparsity (DESIGN.md: "one round from a trained
or fresh network"): a ``contsparse train`` run, a checkpoint of their own, a torchvision-style
ResNet. The weights load into the plain model before any mask attaches, so masks, rewinding and
the dense baseline all see them as the run's initialisation.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from contsparse.errors import UserError

RUN_MODEL = "model.safetensors"  # a finished run's final model (RunDir.MODEL)
# Where common training scripts keep the model's state_dict inside a checkpoint dict
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Prefixes that wrappers put before every key: DistributedDataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def weights_file(source: str | Path) -> Path:
    """The file ``--weights-from`` names: the file itself, or a finished run's final model."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / RUN_MODEL
        if not path.is_file():
            raise UserError(f"--weights-from {source}: no {RUN_MODEL} in it (a run that has not finished?)")
    elif not path.is_file():
        raise UserError(f"--weights-from {source} does not exist")
    return path


def read_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """A state_dict from a safetensors file, or from a ``torch.save`` file read with
    ``weights_only=True`` (no code runs), taken out of a checkpoint dict and wrappers' prefixes."""
    path = weights_file(source)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            with warnings.catch_warnings():  # e.g. a pickle protocol it does not expect: the error below says it all
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, SafetensorError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise UserError(f"--weights-from {path} cannot be read as a safetensors or torch.save file "
                        f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else err})"
                        ) from err
    return _unwrapped(_state_dict_in(state, path))


def _state_dict_in(state: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state
    if isinstance(state, dict):
        for key in NESTED_KEYS:
            if isinstance(state.get(key), dict):
                return _state_dict_in(state[key], path)
        keys = ", ".join(map(str, list(state)[:6])) or "none"
        raise UserError(f"--weights-from {path} holds no state_dict of tensors (its keys: {keys}; a checkpoint keeps "
                        f"one under {', '.join(NESTED_KEYS)})")
    raise UserError(f"--weights-from {path} holds a {type(state).__name__}, not a state_dict")


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in WRAPPER_PREFIXES:
        if all(str(key).startswith(prefix) for key in state):
            state = {str(key)[len(prefix):]: value for key, value in state.items()}
    return state


def load_starting_weights(model: nn.Module, source: str | Path) -> None:
    """Load ``source``'s weights into the plain ``model`` (no masks attached yet), all of them:
    a state_dict that does not fit is refused with what differs, never loaded in part."""
    state = read_weights(source)
    own = model.state_dict()
    shapes = [f"{key} {tuple(value.shape)} (the model's: {tuple(own[key].shape)})" for key, value in state.items()
              if key in own and value.shape != own[key].shape]
    missing = [key for key in own if key not in state]
    unexpected = [key for key in state if key not in own]
    problems = [f"{what}: {_some(keys)}" for what, keys in (("other shapes", shapes), ("missing", missing),
                                                            ("not in the model", unexpected)) if keys]
    if problems:
        raise UserError(f"--weights-from {source} does not fit this model ({'; '.join(problems)}): give the weights "
                        "of the same --model, dataset shape and classes")
    with torch.no_grad():
        model.load_state_dict(state)


def file_digest(source: str | Path) -> str:
    """sha256 of the weights file: the summary records which weights a run started from."""
    digest = hashlib.sha256()
    with open(weights_file(source), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _some(keys: list[str], shown: int = 4) -> str:
    return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")
