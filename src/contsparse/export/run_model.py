"""A finished run's model as the plain architecture: masks folded in, no contsparse modules left."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from contsparse.errors import UserError
from contsparse.experiments.config import load_saved_config, make_config
from contsparse.experiments.rundir import RunDir
from contsparse.experiments.user_modules import trusting_only
from contsparse.models import build_model


@dataclass
class RunModel:
    model: nn.Module  # the vanilla architecture in eval mode, pruned weights exactly zero
    name: str  # registry name of the architecture
    input_shape: tuple[int, ...]
    num_classes: int
    masks: dict[str, torch.Tensor]  # weight name -> bool mask of the weights kept
    dataset: str
    data_dir: str | None


def load_run_model(run_dir: str | Path, imports: Iterable[str] = ()) -> RunModel:
    """Build the run's architecture and load its final weights (``model.safetensors``).

    A run whose model comes from the user's own modules lists them in its config.yaml; importing
    one runs its code, so a run folder (perhaps someone else's) is not enough: each must also be
    named in ``imports`` (``--imports``), the caller's word that it is trusted."""
    run = RunDir(run_dir)
    summary = run.read_summary()  # refuses what is not a finished run, with the reason
    try:
        with trusting_only(imports):
            config = make_config(load_saved_config(run.file(RunDir.CONFIG)))
    except UserError as err:
        raise UserError(f"{run.path}: {err}") from err
    edited = " (config.yaml was edited by hand: restore it)" if run.config_edited() else ""
    if config.model != summary["model"]:
        raise UserError(f"{run.path}: its config.yaml names the model {config.model}, its summary.json "
                        f"{summary['model']}{edited}")
    if "input_shape" in summary:
        input_shape, num_classes = tuple(summary["input_shape"]), int(summary["num_classes"])
    else:  # runs written before the summary recorded the data's shape
        from contsparse.data import load_dataset

        data = load_dataset(config.dataset, config.data_dir, config.data_options())
        input_shape, num_classes = data.input_shape, data.num_classes
    model = build_model(config.model, input_shape, num_classes)
    masks = _final_masks(run)
    try:
        model.load_state_dict(_final_tensors(run, RunDir.MODEL, "model"))
    except RuntimeError as err:  # load_state_dict lists every key: the first line says enough
        raise UserError(f"the final model of {run.path} does not fit the architecture its config.yaml names "
                        f"({config.model}){edited}: {' '.join(str(err).split())[:300]}") from err
    return RunModel(model.eval(), config.model, input_shape, num_classes, masks, config.dataset, config.data_dir)


def load_run_masks(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """A finished run's final masks (weight name -> bool), without building its model."""
    run = RunDir(run_dir)
    run.read_summary()  # refuses what is not a finished run, with the reason
    return _final_masks(run)


def _final_masks(run: RunDir) -> dict[str, torch.Tensor]:
    return {k: v.bool() for k, v in _final_tensors(run, RunDir.MASKS, "masks").items()}


def _final_tensors(run: RunDir, name: str, what: str) -> dict[str, torch.Tensor]:
    """A finished run's ``model.safetensors`` or ``masks.safetensors``; a damaged one is written
    again from the last checkpoint by a resume once the summary is gone."""
    try:
        return load_file(str(run.file(name)))
    except (OSError, SafetensorError) as err:
        raise UserError(f"the final {what} of {run.path} cannot be read ({err}); to write it again from the run's "
                        f"last checkpoint, delete {run.file(RunDir.SUMMARY)} and run: contsparse resume {run.path}"
                        ) from err
