"""Timing that survives a noisy machine: variants measured in alternating blocks, medians compared."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved_times(steps: dict[str, Callable[[], object]], blocks: int, steps_per_block: int,
                      warmup: int = 20, sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call of each variant, measured in alternating blocks so that the
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
