"""Dataset registry: name -> loader returning :class:`DatasetSplits`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contsparse.data import imagenet, mnist
from contsparse.data.cifar import VARIANTS, load_cifar
from contsparse.data.imagenet import load_image_folder
from contsparse.data.mnist import load_mnist
from contsparse.data.splits import DatasetSplits
from contsparse.data.synthetic import load_synthetic


@dataclass(frozen=True)
class DataOptions:
    """Settings some datasets take (the rest ignore them)."""

    image_size: int = 224  # imagenet: crop size
    workers: int = 4  # imagenet: decoding processes
    synthetic_shape: tuple[int, ...] = (1, 28, 28)
    synthetic_classes: int = 10
    synthetic_size: int = 2048  # synthetic: training examples (validation and test: up to 256 each)


DatasetLoader = Callable[[Path | None, DataOptions], DatasetSplits]

_REGISTRY: dict[str, DatasetLoader] = {
    "mnist": lambda data_dir, options: load_mnist(data_dir),
    "cifar10": lambda data_dir, options: load_cifar(VARIANTS["cifar10"], data_dir),
    "cifar100": lambda data_dir, options: load_cifar(VARIANTS["cifar100"], data_dir),
    "imagenet": lambda data_dir, options: load_image_folder(data_dir, options.image_size, options.workers),
    "synthetic": lambda data_dir, options: load_synthetic(options.synthetic_shape, options.synthetic_classes,
                                                          (options.synthetic_size,
                                                           min(256, options.synthetic_size),
                                                           min(256, options.synthetic_size))),
}


def available_datasets() -> list[str]:
    return sorted(_REGISTRY)


def register_dataset(name: str, loader: DatasetLoader) -> None:
    """Add a dataset: ``loader(data_dir, options)`` returns its :class:`DatasetSplits`."""
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} registered twice")
    _REGISTRY[name] = loader


def load_dataset(name: str, data_dir: str | Path | None = None, options: DataOptions | None = None) -> DatasetSplits:
    try:
        loader = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}") from None
    return loader(Path(data_dir) if data_dir is not None else None, options or DataOptions())


def input_preprocessing(name: str, input_shape: tuple[int, ...]) -> dict[str, Any] | None:
    """How the built-in datasets turn images into model inputs, for exports to record: a model
    fed raw pixels instead predicts garbage without an error. None for synthetic and registered
    datasets, whose preprocessing contsparse does not know."""
    if name == "mnist":
        return {"pixels": "grey bytes / 255", "mean": [mnist.MEAN], "std": [mnist.STD], "layout": "NCHW"}
    if name in VARIANTS:
        variant = VARIANTS[name]
        return {"pixels": "RGB bytes / 255", "mean": list(variant.mean), "std": list(variant.std), "layout": "NCHW"}
    if name == "imagenet":
        size = input_shape[-1]
        return {"pixels": "RGB bytes / 255", "mean": list(imagenet.MEAN), "std": list(imagenet.STD), "layout": "NCHW",
                "resize": f"shorter side to {round(size * 256 / 224)}, centre crop {size}x{size}, bilinear"}
    return None
