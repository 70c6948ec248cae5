"""Datasets (MNIST, CIFAR-10/100, ImageNet folders, synthetic) and the seeded batch iterators serving them."""

from contsparse.data.registry import (
    DataOptions,
    available_datasets,
    input_preprocessing,
    load_dataset,
    register_dataset,
)
from contsparse.data.splits import BatchIterator, DatasetSplits, TensorSplit, make_batches, without_augmentation

__all__ = ["BatchIterator", "DataOptions", "DatasetSplits", "TensorSplit", "available_datasets", "input_preprocessing",
           "load_dataset", "make_batches", "register_dataset", "without_augmentation"]
