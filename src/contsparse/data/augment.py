"""Batched tensor augmentation: whole batches at once, no per-image Python loop."""

from __future__ import annotations

import torch
from torch import Tensor


def pad_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """CIFAR's standard augmentation: zero-pad by ``pad``, crop back to the original size at a
    random offset, and flip half the images horizontally (each image its own draw).

    The crop is one gather with per-image row/column indices, so its cost does not depend on the
    batch size in Python.
    """
    n, _, height, width = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(height, device=x.device)  # (n, H)
    cols = dx[:, None] + torch.arange(width, device=x.device)  # (n, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # padded[b, :, rows[b, i], cols[b, j]] for every b, i, j
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
