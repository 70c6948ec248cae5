"""Weights-remaining accounting, shared by every method so that all report sparsity alike."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor


def weights_remaining(masks: Mapping[str, Tensor]) -> float:
    """Fraction (0..1) of prunable weights kept by ``masks`` (name -> bool/0-1 tensor)."""
    total = sum(m.numel() for m in masks.values())
    if total == 0:
        return 1.0
    kept = sum(int(m.count_nonzero()) for m in masks.values())
    return kept / total


def per_layer_remaining(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """Name -> fraction of that tensor's weights kept."""
    return {name: int(m.count_nonzero()) / max(m.numel(), 1) for name, m in masks.items()}


def count_zeros(tensors: Mapping[str, Tensor]) -> tuple[int, int]:
    """(zeros, total) over ``tensors``: used to check that a saved ticket has the zeros it claims."""
    zeros = sum(int((t == 0).sum()) for t in tensors.values())
    return zeros, sum(t.numel() for t in tensors.values())
