"""Batched tensor augmentation: whole batches at once, no per-image Python loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def pad_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 4,
                  fill: Sequence[float] | None = None) -> Tensor:
    """CIFAR's standard augmentation: pad by ``pad`` (zeros, or ``fill`` per channel), crop back
    to the original size at a random offset, and flip half the images horizontally (each image
    its own draw).

    The crop is one gather with per-image row/column indices, so its cost does not depend on the
    batch size in Python.
    """
    n, channels, height, width = x.shape
    if fill is None:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    else:
        padded = torch.tensor(fill, dtype=x.dtype, device=x.device).view(1, channels, 1, 1).repeat(
            n, 1, height + 2 * pad, width + 2 * pad)
        padded[:, :, pad:pad + height, pad:pad + width] = x
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


@dataclass(frozen=True)
class PadCropFlip:
    """:func:`pad_crop_flip` on normalised images, padding with ``fill``: the normalised value of
    black, as torchvision's ``RandomCrop(32, padding=4)`` before ``Normalize`` pads. (Zeros would
    be the mean colour.) A picklable callable, as data-parallel and sweep workers need."""

    fill: tuple[float, ...]
    pad: int = 4

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return pad_crop_flip(x, generator, self.pad, self.fill)
