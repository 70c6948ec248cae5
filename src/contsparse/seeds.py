"""Generators for seeds derived from a run's seed (per epoch, batch or image)."""

from __future__ import annotations

import torch

SEED_RANGE = 2**64  # torch's manual_seed takes any unsigned 64-bit value


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU generator for a seed derived from the run's (``seed * 1_000_003 + epoch``, ...),
    folded into the range ``manual_seed`` accepts: a large run seed times the multipliers exceeds
    64 bits. Seeds already in range are unchanged, so existing runs draw the same numbers."""
    return torch.Generator().manual_seed(seed % SEED_RANGE)
