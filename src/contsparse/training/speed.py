"""Process-level CPU speed settings."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_tuned = False


def tune_cpu_allocator() -> bool:
    """Keep freed weight-sized buffers in glibc's heap instead of returning them to the OS.

    PyTorch's CPU allocator is plain ``malloc``; glibc serves blocks of a few hundred KB by
    ``mmap`` and gives them back on ``free``, so every step page-faults fresh memory for each
    weight-sized temporary. Raising the thresholds removes that (a third of a CS step on
    LeNet-300-100, see benchmarks/overhead.py). No effect off glibc. Returns whether it applied.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 256 * 1024 * 1024) == 1
    except (OSError, AttributeError):
        return False
    _tuned = ok
    return ok
