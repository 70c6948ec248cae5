"""Datasets as in-memory tensors (MNIST, synthetic), served by a seeded batch iterator."""

from contsparse.data.registry import available_datasets, load_dataset, register_dataset
from contsparse.data.splits import BatchIterator, DatasetSplits, TensorSplit

__all__ = ["BatchIterator", "DatasetSplits", "TensorSplit", "available_datasets", "load_dataset",
           "register_dataset"]
