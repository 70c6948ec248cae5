"""A run directory: config.yaml, metrics.jsonl, checkpoint/, masks and model, summary.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from contsparse.errors import UserError


class RunDir:
    CONFIG, METRICS, SUMMARY = "config.yaml", "metrics.jsonl", "summary.json"
    CHECKPOINT, MASKS, MODEL = "checkpoint", "masks.safetensors", "model.safetensors"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create run directory {self.path}: {err.strerror}") from err

    # -- files ------------------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINT

    def is_finished(self) -> bool:
        return self.file(self.SUMMARY).is_file()

    def read_summary(self) -> dict[str, Any]:
        path = self.file(self.SUMMARY)
        if not path.is_file():
            if not self.file(self.CONFIG).is_file():
                raise UserError(f"{self.path} is not a contsparse run directory (no {self.CONFIG})")
            raise UserError(f"run {self.path} has not finished yet (no {self.SUMMARY}); re-run its command to resume")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is damaged: {err}") from err

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_text_atomic(self.file(self.SUMMARY), json.dumps(summary, indent=2) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.file(self.METRICS), "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_metrics(self, lines: int) -> None:
        """Drop records written after the checkpoint a resumed run restarts from."""
        path = self.file(self.METRICS)
        if path.is_file():
            kept = path.read_text().splitlines(keepends=True)[:lines]
            write_text_atomic(path, "".join(kept))

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.file(name + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self.file(name))


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
