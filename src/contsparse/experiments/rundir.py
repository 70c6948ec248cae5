"""A run directory: config.yaml, metrics.jsonl, checkpoint/, masks and model, summary.json."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save_file

from contsparse.errors import UserError
from contsparse.experiments.lock import holder
from contsparse.storage import (
    WRITE_ERRORS,
    failed_write_reason,
    file_in_the_way,
    for_safetensors,
    fsync_file,
    missing_folders,
    remove_empty_folders,
    replaced_atomically,
    strict_json,
    write_atomic,
)

T = TypeVar("T")
# The first line of config.yaml (a YAML comment)
CONFIG_DIGEST = "# written by contsparse; edits by hand are checked against the run's checkpoint. sha256: "


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _writes(method: Callable[..., T]) -> Callable[..., T | None]:
    """A RunDir write: skipped (None) in read-only (non-zero-rank) processes; an OSError becomes a
    one-line :class:`UserError`."""

    @functools.wraps(method)
    def write(self: RunDir, *args: Any, **kwargs: Any) -> T | None:
        if not self.writable:
            return None
        with writing(self.path):
            return method(self, *args, **kwargs)

    return write


class RunDir:
    CONFIG, METRICS, SUMMARY = "config.yaml", "metrics.jsonl", "summary.json"
    CHECKPOINT, MASKS, MODEL = "checkpoint", "masks.safetensors", "model.safetensors"
    ROUND_MASKS = "round_masks"  # IMP: each round's ticket mask, round-<r>.safetensors

    def __init__(self, path: str | Path, writable: bool = True) -> None:
        self.path = Path(path)
        # False in data-parallel processes other than rank 0: they read the run, never write it.
        self.writable = writable
        self._created_parents: list[Path] = []  # folders create() made above the run directory

    def create(self) -> None:
        if not self.writable:
            return
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"run directory {self.path} is a file; choose another --out")
        blocking = file_in_the_way(self.path)
        if blocking is not None:
            raise UserError(f"cannot create the run directory {self.path}: {blocking} is a file; choose another --out")
        missing = missing_folders(self.path)
        with writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        self._created_parents = missing[1:]  # innermost first: removed again with an unclaimed run

    def remove_if_unclaimed(self) -> None:
        """Remove the directory if it holds nothing but a lock (or a half-written config): what a
        new run that stopped before writing its settings leaves behind (a refused setting, missing
        data). On success the directory holds the run and stays."""
        if not (self.writable and self.path.is_dir() and self.is_empty()):
            return
        try:
            for entry in self.path.iterdir():
                entry.unlink()
            self.path.rmdir()
        except OSError:
            return  # another process claimed it meanwhile, or a file system that refuses: leave it
        remove_empty_folders(self._created_parents)  # folders made for it, if still empty

    def is_empty(self) -> bool:
        """Nothing but (maybe) our own lock file, or the config file a run killed while writing it
        left half-written: a fresh directory a run may claim."""
        return all(entry.name.startswith(".lock") or entry.name == self.CONFIG + ".tmp"
                   for entry in self.path.iterdir())

    # -- files ------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    def owns(self, path: str | Path) -> bool:
        """Whether ``path`` is one of the files contsparse keeps in this run (writing over it would
        damage the run): its config, records, final tensors, checkpoints, lock, dense baseline."""
        try:
            relative = Path(path).resolve().relative_to(self.path.resolve())
        except ValueError:
            return False
        first = relative.parts[0] if relative.parts else ""
        return first in (self.CONFIG, self.METRICS, self.SUMMARY, self.MASKS, self.MODEL, self.ROUND_MASKS, ".lock",
                         "dense") \
            or first.startswith(self.CHECKPOINT)

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINT

    def has_started(self) -> bool:
        """Whether any training happened here (a checkpoint or a metrics record exists)."""
        return any(self.path.glob(self.CHECKPOINT + "*")) or self.file(self.METRICS).is_file()

    def is_finished(self) -> bool:
        return self.file(self.SUMMARY).is_file()

    def require_run(self) -> None:
        """Refuse a path that holds no run, with the reason."""
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a directory")
        if not self.file(self.CONFIG).is_file():
            from contsparse.experiments.sweep import is_sweep  # (they build on run directories)
            from contsparse.reports.collect import is_comparison

            kind = "a sweep" if is_sweep(self.path) else "a comparison" if is_comparison(self.path) else None
            again = {"a sweep": "contsparse sweep", "a comparison": "contsparse compare"}.get(kind or "")
            raise UserError(f"{self.path} is not a contsparse run directory (no {self.CONFIG})"
                            + (f": it is {kind}, whose runs are its subfolders (contsparse report {self.path} "
                               f"shows them all; the same {again} command, run again, continues it)" if kind else ""))

    def read_summary(self) -> dict[str, Any]:
        self.require_run()
        path = self.file(self.SUMMARY)
        if not path.is_file():
            running = holder(self.path)
            raise UserError(f"run {self.path} has not finished yet (no {self.SUMMARY}); " + (
                f"it is running ({running}): wait for it to finish" if running
                else f"resume it with: contsparse resume {self.path}"))
        try:
            summary = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is damaged ({err}); delete it and resume the run to write it again") from err
        if not isinstance(summary, dict):
            raise UserError(f"{path} is damaged (a JSON {type(summary).__name__}, not an object); delete it and "
                            "resume the run to write it again")
        wrong = [f"{key} ({what})" for key, (check, what) in SUMMARY_FIELDS.items() if not check(summary.get(key))]
        if wrong:
            raise UserError(f"{path} is damaged: missing or wrong {', '.join(wrong)}; delete it and resume the run "
                            "to write it again")
        return summary

    @_writes
    def write_config(self, text: str) -> None:
        """config.yaml, headed by the digest of the settings as written: a later edit by hand is
        then told apart from settings contsparse accepted (a --force resume writes new ones)."""
        write_atomic(self.file(self.CONFIG), (f"{CONFIG_DIGEST}{_sha256(text)}\n{text}").encode())

    def config_edited(self) -> bool:
        """Whether config.yaml may have changed since contsparse wrote it: only a digest line that
        matches the settings below it says it has not (a tool that rewrote the file dropped it)."""
        try:
            first, _, rest = self.file(self.CONFIG).read_text().partition("\n")
        except (OSError, UnicodeDecodeError):
            return True
        return not first.startswith(CONFIG_DIGEST) or first[len(CONFIG_DIGEST):] != _sha256(rest)

    @_writes
    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.file(self.SUMMARY), (strict_json(summary, indent=2) + "\n").encode())

    @_writes
    def append_metrics(self, record: dict[str, Any]) -> str:
        """Append the epoch's record; returns its line (checkpoints keep the lines written so far)."""
        line = strict_json(record) + "\n"
        with open(self.file(self.METRICS), "a") as handle:
            handle.write(line)
        return line

    def metrics_lines(self) -> list[str]:
        """The lines of metrics.jsonl (each with its newline)."""
        path = self.file(self.METRICS)
        if not path.is_file():
            return []
        # lines as truncate_metrics counts them; surrogateescape: bytes that are not UTF-8 survive
        # the round trip through the checkpoint
        return [line.decode(errors="surrogateescape") for line in path.read_bytes().splitlines(keepends=True)]

    @_writes
    def restore_metrics(self, lines: list[str]) -> bool:
        """Make metrics.jsonl hold exactly ``lines`` (the records of the checkpoint a resumed run
        restarts from): drops later records, and rewrites a file cut short, torn or deleted.
        Returns whether records had been lost (and are now restored)."""
        path = self.file(self.METRICS)
        expected = "".join(lines).encode(errors="surrogateescape")
        current = path.read_bytes() if path.is_file() else b""
        if current == expected:
            return False
        lost = not current.startswith(expected)
        write_atomic(path, expected)
        return lost

    @_writes
    def truncate_metrics(self, lines: int) -> None:
        """Drop records written after the checkpoint a resumed run restarts from."""
        path = self.file(self.METRICS)
        if path.is_file():  # as bytes: a crash may have left a torn, undecodable last line
            write_atomic(path, b"".join(path.read_bytes().splitlines(keepends=True)[:lines]))

    @_writes
    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.file(name)
        path.parent.mkdir(exist_ok=True)
        with replaced_atomically(path) as tmp:
            save_file(for_safetensors(tensors), str(tmp))
            fsync_file(tmp)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# What every reader of summary.json relies on: key -> (check, what it must be)
SUMMARY_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{key: ((lambda v: isinstance(v, str)), "text") for key in ("command", "method", "model", "dataset")},
    **{key: (_number, "a number") for key in ("weights_remaining", "test_accuracy", "wall_seconds")},
    "train_epochs": ((lambda v: isinstance(v, int) and not isinstance(v, bool)), "an integer"),
    "per_layer": ((lambda v: v is None or (isinstance(v, dict) and all(map(_number, v.values())))),
                  "layer -> fraction kept"),
    # absent from runs of versions before they were recorded
    "input_shape": ((lambda v: v is None or (isinstance(v, list) and all(isinstance(d, int) and d > 0 for d in v))),
                    "a list of sizes"),
    "num_classes": ((lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v > 0)),
                    "a positive integer"),
    **{key: ((lambda v: v is None or _number(v)), "a number") for key in (
        "val_accuracy", "dense_test_accuracy", "dense_val_accuracy", "dense_wall_seconds")},
    "dense_train_epochs": ((lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))), "an integer"),
}


COLLECTION_MARKERS = {"sweep.yaml": "sweep", "compare.json": "comparison"}  # the file that makes a folder one
# Files of a sweep or comparison folder that contsparse reads back (plans, tables) or writes; its
# logs/ folder and hidden files (the sweep's lock and token) are its own too
COLLECTION_FILES = {"sweep.yaml", "sweep.json", "sweep.csv", "sweep.md", "sweep.png", "compare.json", "compare.csv",
                    "compare.md", "accuracy_vs_weights.png", "accuracy_vs_epochs.png"}
REPORT_FOLDER = "report"  # where `contsparse report` writes about a run or comparison by default


def collection_kind(folder: Path) -> str | None:
    """"sweep" or "comparison" for a folder that is one (its marker file is in it), else None."""
    return next((kind for marker, kind in COLLECTION_MARKERS.items() if (folder / marker).is_file()), None)


def folder_owning(path: Path, flag: str) -> Path | None:
    """The run, sweep or comparison folder whose own file ``path`` is, if any (writing over it would
    damage that folder): the nearest run folder above it decides (a ticket's dense/ baseline is a
    run of its own inside the ticket's folder). A collection's ``report/`` folder is the reports'.
    ``flag`` names the path in the one-line error for a path that cannot be resolved."""
    try:
        resolved = path.resolve()
        for folder in resolved.parents:
            if (folder / RunDir.CONFIG).is_file():
                return folder if RunDir(folder).owns(resolved) else None
            if collection_kind(folder) is not None:
                # its tables, logs/, lock and token; and its run folders, also those not made yet
                parts = resolved.relative_to(folder).parts
                first = parts[0]
                if first == REPORT_FOLDER and len(parts) > 1:
                    return None
                return folder if len(parts) > 1 or first in COLLECTION_FILES or first.startswith(".") else None
    except (OSError, RuntimeError) as err:  # a name too long, a symlink loop
        raise UserError(f"{flag} {path}: {getattr(err, 'strerror', None) or err}") from err
    return None


def given_file(source: str | Path, flag: str, name: str) -> Path:
    """The file a flag names: the file itself, or a finished run's ``name`` (``--mask-from RUN``:
    its final masks, ``--weights-from RUN``: its final model), with a one-line error otherwise."""
    if not str(source).strip():
        raise UserError(f"{flag} needs a path: a file or a finished run's directory")
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / RunDir.CONFIG).is_file():
            raise UserError(f"{flag} {source} is a folder but not a run directory (a sweep or comparison folder?): "
                            "give one of its runs, or a file")
        path = path / name
        if not path.is_file():
            raise UserError(f"{flag} {source}: no {name} in it (a run that has not finished?)")
    elif not path.is_file():
        raise UserError(f"{flag} {source} does not exist")
    return path


def require_collection_folder(path: Path, marker: str, what: str, holds_runs: bool = False) -> None:
    """Refuse an ``--out`` for a sweep or comparison that is a run directory, or a folder with
    other files in it (its runs and tables would be mixed with them): it must be new, empty, or
    one made before (``marker`` in it, or, with ``holds_runs``, run directories)."""
    if not path.exists():
        return
    if not path.is_dir():
        raise UserError(f"--out {path} is a file; give a folder for the {what}")
    if (path / RunDir.CONFIG).is_file():
        raise UserError(f"--out {path} is a run directory; give a new folder for the {what}")
    other = next((name for name in COLLECTION_MARKERS if name != marker and (path / name).is_file()), None)
    if other is not None:
        raise UserError(f"--out {path} is a {COLLECTION_MARKERS[other]} folder; give a new folder for the {what}")
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]  # hidden: the sweep's token, .DS_Store
    made_before = (path / marker).exists() or (holds_runs and any((e / RunDir.CONFIG).is_file() for e in entries))
    if entries and not made_before:
        raise UserError(f"--out {path} holds other files (no {marker}); give an empty or new folder for the {what}")


@contextmanager
def writing(directory: Path) -> Iterator[None]:
    """Turn a failed write (disk full, read-only, permissions) into a one-line :class:`UserError`."""
    try:
        yield
    except WRITE_ERRORS as err:
        raise UserError(f"cannot write in {directory} ({failed_write_reason(err)}); fix that and run the same "
                        "command again to resume from the last checkpoint") from err
