"""Shared helpers for the benchmark scripts: results files and interleaved timing."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from contsparse.timing import interleaved_times

__all__ = ["RESULTS", "interleaved_times", "machine", "write_results"]

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processor": _cpu_model() or platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _cpu_model() -> str | None:
    """The CPU's model name on Linux: the shared machines behind this project change between
    sessions, and ratios are only comparable on the same CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
