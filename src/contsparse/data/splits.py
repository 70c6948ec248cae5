"""In-memory datasets and the batch iterator that serves them without a per-sample Python loop."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from contsparse.seeds import seeded_generator

Augment = Callable[[Tensor, torch.Generator], Tensor]
Shard = tuple[int, int]  # (rank, world size) of a data-parallel process


class ShareOfBatch(NamedTuple):
    """This process's share of a global batch (``tensor_split(world)[rank]`` of it), served by an
    iterator that loads only that share: under data parallelism decoding the images the other
    processes train on would multiply the decoding work by their number."""

    x: Tensor
    y: Tensor
    global_size: int  # examples in the whole batch, over every process


@dataclass
class TensorSplit:
    """Inputs ``x`` (N, ...) and integer labels ``y`` (N,), already normalised."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        # the loss takes int64 class indices: int32 labels (from numpy, say) are widened once here
        if not self.y.is_floating_point() and self.y.dtype not in (torch.int64, torch.bool):
            self.y = self.y.long()

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int) -> TensorSplit:
        return TensorSplit(self.x[:n], self.y[:n])

    def to(self, device: torch.device | str) -> TensorSplit:
        return TensorSplit(self.x.to(device), self.y.to(device))


@dataclass
class DatasetSplits:
    """Train / validation / test splits of one dataset, plus what a model builder needs."""

    name: str
    train: TensorSplit
    val: TensorSplit
    test: TensorSplit
    input_shape: tuple[int, ...]
    num_classes: int
    augment: Augment | None = None


def without_augmentation(data: DatasetSplits) -> DatasetSplits:
    """The same splits with training batches served as they are: no batched augmentation (CIFAR's
    crops and flips), and image folders decoded as for evaluation (ImageNet: resize and centre
    crop instead of random resized crops and flips)."""
    train = data.train
    if dataclasses.is_dataclass(train) and getattr(train, "train", None) is True:  # decoded per image
        train = dataclasses.replace(train, train=False)
    return dataclasses.replace(data, train=train, augment=None)


class BatchIterator:
    """Shuffled mini-batches from in-memory tensors.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees exactly the
    batches an uninterrupted one would.
    """

    def __init__(self, split: TensorSplit, batch_size: int, shuffle: bool = False, seed: int = 0,
                 augment: Augment | None = None, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.seed, self.augment, self.drop_last = seed, augment, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self.iterate()

    def iterate(self, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``start, start + 1, ...`` of this epoch (a run resumed mid-epoch skips the rest).

        Augmentation draws from a generator seeded per batch, so skipping batches changes nothing.
        """
        n = len(self.split)
        base_seed = self.seed * 1_000_003 + self.epoch
        order = torch.randperm(n, generator=seeded_generator(base_seed)) if self.shuffle else None
        for batch in range(start, len(self)):
            begin = batch * self.batch_size
            if order is None:
                x, y = self.split.x[begin:begin + self.batch_size], self.split.y[begin:begin + self.batch_size]
            else:
                index = order[begin:begin + self.batch_size].to(self.split.x.device)
                x, y = self.split.x.index_select(0, index), self.split.y.index_select(0, index)
            if self.augment is not None:
                x = self.augment(x, seeded_generator(base_seed * 100_003 + batch))
            yield x, y


def make_batches(split, batch_size: int, shuffle: bool = False, seed: int = 0, augment: Augment | None = None,
                 shard: Shard | None = None):
    """The batch iterator of ``split``: in-memory tensors, or a split that serves its own
    (``split.batches(...)``, e.g. image files decoded by worker processes). With ``shard`` such a
    split serves only the process's :class:`ShareOfBatch` of each batch; in-memory batches come
    whole (the training step takes its share, a slice)."""
    if hasattr(split, "batches"):
        options = {} if shard is None else {"shard": shard}
        return split.batches(batch_size, shuffle=shuffle, seed=seed, augment=augment, **options)
    return BatchIterator(split, batch_size, shuffle=shuffle, seed=seed, augment=augment)
