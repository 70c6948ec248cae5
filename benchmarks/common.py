"""Shared helpers for the benchmark scripts: results files and interleaved timing."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def interleaved_times(steps: dict[str, Callable[[], None]], blocks: int, steps_per_block: int,
                      warmup: int = 20, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per step of each variant, measured in alternating blocks so that the
    machine's drift hits every variant alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(blocks):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(steps_per_block):
                step()
            sync()
            samples[name].append((time.perf_counter() - start) / steps_per_block)
    return {name: statistics.median(values) for name, values in samples.items()}


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown)
    print(markdown)
