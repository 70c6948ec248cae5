"""``contsparse export``: a finished run's model in the formats other tools load."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save

from contsparse.data import input_preprocessing
from contsparse.errors import UserError
from contsparse.experiments.rundir import folder_owning
from contsparse.export.compressed import compressed_bytes
from contsparse.export.run_model import RunModel, load_run_model
from contsparse.storage import (
    file_in_the_way,
    for_safetensors,
    fsync_file,
    missing_folders,
    remove_empty_folders,
    replaced_atomically,
    write_atomic,
)

FORMATS = {"safetensors": ".safetensors", "pytorch": ".pt", "onnx": ".onnx", "compressed": ".sparse.safetensors"}


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, imports: Iterable[str] = (),
               replace: bool = True) -> Path:
    """Write the run's final model as ``fmt`` (see :data:`FORMATS`) to ``out`` (default: in the run).
    ``imports``: the modules of the run's config.yaml that the caller trusts (see load_run_model).
    ``replace=False`` (the CLI without ``--force``) keeps an existing file at ``out``, someone's
    work, but for the run's own ``export.*`` files, which export writes."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    if out is not None and str(out).endswith(("/", os.sep)):  # (a Path drops the slash that says "a folder")
        raise UserError(f"--out {out} names a folder; give a file name")
    path = Path(out) if out is not None else Path(run_dir) / f"export{FORMATS[fmt]}"
    named = _format_named_by(path)
    if named is not None and named != fmt and (fmt, named) != ("compressed", "safetensors"):
        raise UserError(f"--out {path} names {_a(named)} file but --format is {fmt}: give --format {named} or a "
                        f"name ending in {FORMATS[fmt]}")
    owner = folder_owning(path, "--out")
    if owner is not None:
        raise UserError(f"--out {path} is one of the files of the run, sweep or comparison {owner}; writing it "
                        "would damage it: give another file name")
    run = load_run_model(run_dir, imports)
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name")
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise UserError(f"--out {path}: {blocking} is a file, not a folder")
    if path.exists() and not path.is_file():  # a device or a pipe: the atomic rename would replace it
        raise UserError(f"--out {path} is not a regular file; give a file name")
    if path.is_file() and not replace and not _is_default_export(path, run_dir):
        raise UserError(f"--out {path} exists: give --force to replace it, or another file name")
    made = missing_folders(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if fmt == "onnx":
            export_onnx(run, path)
        else:
            # Serialised in memory and written by Python: a failed write is an OSError with its
            # reason (torch.save and safetensors raise their own errors), and never half a file
            write_atomic(path, _serialise(run, fmt))
    except OSError as err:
        remove_empty_folders(made)
        raise UserError(f"cannot write {path}: {err.strerror or err}") from err
    except BaseException:  # a model ONNX cannot trace, Ctrl-C: no folders left behind for nothing
        remove_empty_folders(made)
        raise
    return path


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _is_default_export(path: Path, run_dir: str | Path) -> bool:
    """Whether ``path`` is one of the files export writes into the run by default."""
    try:
        return path.resolve() in {(Path(run_dir) / f"export{suffix}").resolve() for suffix in FORMATS.values()}
    except (OSError, RuntimeError):
        return False


def _format_named_by(path: Path) -> str | None:
    """The export format a file name says it holds, if any."""
    name = path.name.lower()
    if name.endswith(FORMATS["compressed"]):
        return "compressed"
    suffixes = {suffix: fmt for fmt, suffix in FORMATS.items()} | {".pth": "pytorch"}
    return suffixes.get(path.suffix.lower())


def _serialise(run: RunModel, fmt: str) -> bytes:
    state = {k: v.detach().contiguous() for k, v in run.model.state_dict().items()}
    if fmt == "safetensors":
        return save(for_safetensors(state), metadata=_metadata(run))
    if fmt == "compressed":
        return compressed_bytes(state, extra_metadata=_metadata(run))
    buffer = io.BytesIO()
    torch.save(state, buffer)  # a plain state_dict: torch.load(path, weights_only=True) reads it
    return buffer.getvalue()


def export_onnx(run: RunModel, path: Path) -> None:
    """ONNX with a dynamic batch dimension (PyTorch's ``torch.export``-based exporter)."""
    try:
        import onnxscript  # noqa: F401 - the exporter needs it
    except ImportError as err:
        raise UserError("ONNX export needs the onnx extras: pip install 'contsparse[onnx]'") from err
    example = torch.zeros(2, *run.input_shape)
    batch = torch.export.Dim("batch", min=1)
    # torch's exporter logs notes ("torchvision is not installed") and, when tracing fails, prints
    # graph dumps (dozens of lines) before its error: the error's cause is reported below instead
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict) if name.startswith("torch")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(run.model, (example,), dynamo=True, input_names=["input"],
                                        output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
    except Exception as err:  # torch.export could not trace the model: say why in one line
        raise UserError(f"ONNX export of {run.name} failed ({_root_cause(err)}); the safetensors, pytorch and "
                        "compressed formats need no tracing") from err
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    program.model.metadata_props.update(_metadata(run))
    with replaced_atomically(path) as tmp:  # never half a file at path (a full disk, a crash)
        program.save(str(tmp))
        fsync_file(tmp)


def _root_cause(err: BaseException) -> str:
    """The innermost cause's first line, without terminal colours: torch wraps it in errors whose
    first line only says which export step failed."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    reason = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
    shadowed = re.search(r"module '(\w+)' has no attribute", text)
    if shadowed and Path(shadowed.group(1)).is_dir():  # a folder here imported in place of a missing package
        reason += f"; the folder {shadowed.group(1)}/ in the current directory is taken for a module: run from another"
    return reason


def _metadata(run: RunModel) -> dict[str, str]:
    """What a user of the file needs besides the weights: the architecture, and how inputs were
    preprocessed in training (mean, std, pixel scale) when contsparse knows it."""
    metadata = {"architecture": run.name, "input_shape": json.dumps(list(run.input_shape)),
                "num_classes": str(run.num_classes)}
    preprocessing = input_preprocessing(run.dataset, run.input_shape)
    if preprocessing is not None:
        metadata["input_preprocessing"] = json.dumps(preprocessing)
    return metadata
