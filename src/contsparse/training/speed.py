"""Process-level CPU speed settings."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

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


def flush_denormals() -> bool:
    """Treat subnormal floats (below 1.2e-38 in float32) as zero on the CPU (FTZ/DAZ), as
    TensorFlow's CPU thread pools do; returns whether every thread now flushes.

    From the second search round on, the reset ``s <- min(beta * s, s0)`` leaves most logits far
    below zero, and as the temperature rises ``sigmoid(beta * s)``, the masked weights and their
    gradients pass through the subnormal range, where every operation on them is several times
    slower (``sigmoid`` 3x on this project's CPU). OpenMP's worker threads copy the setting when
    they start, so it reaches them only before the process's first parallel operation. Where they
    already run, the calling thread's setting is left as it was: one operation's chunks must not
    round differently on different threads. The setting stays for the rest of the process and
    holds for Python floats and numpy on the calling thread too.
    """
    was_flushing = _flushes(torch.full((1,), 1e-20))  # one element: computed on this thread
    if not torch.set_flush_denormal(True):
        return False
    # large enough that every thread gets a chunk (PyTorch's grain is 32768 elements)
    if _flushes(torch.full((2 * 32768 * torch.get_num_threads(),), 1e-20)):
        return True
    torch.set_flush_denormal(was_flushing)
    return False


def _flushes(values: torch.Tensor) -> bool:
    """Whether ``1e-20 * 1e-20`` (subnormal in float32) comes out as zero everywhere."""
    return bool(((values * 1e-20) == 0).all())
