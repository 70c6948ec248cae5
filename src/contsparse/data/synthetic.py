"""Random data of any shape: smoke tests and speed tests without a dataset on disk."""

from __future__ import annotations

import torch

from contsparse.data.splits import DatasetSplits, TensorSplit


def load_synthetic(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                   sizes: tuple[int, int, int] = (2048, 256, 256), seed: int = 0) -> DatasetSplits:
    """Class-dependent Gaussian blobs, so that a model can learn something (accuracy > chance)."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, *input_shape, generator=generator)

    def split(n: int) -> TensorSplit:
        y = torch.randint(num_classes, (n,), generator=generator)
        x = centers[y] + 2.0 * torch.randn(n, *input_shape, generator=generator)
        return TensorSplit(x, y)

    train, val, test = (split(n) for n in sizes)
    return DatasetSplits("synthetic", train, val, test, tuple(input_shape), num_classes)
