"""Dataset registry: name -> loader returning :class:`DatasetSplits`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from contsparse.data.mnist import load_mnist
from contsparse.data.splits import DatasetSplits
from contsparse.data.synthetic import load_synthetic

DatasetLoader = Callable[[Path | None], DatasetSplits]

_REGISTRY: dict[str, DatasetLoader] = {
    "mnist": lambda data_dir: load_mnist(data_dir),
    "synthetic": lambda data_dir: load_synthetic(),
}


def available_datasets() -> list[str]:
    return sorted(_REGISTRY)


def register_dataset(name: str, loader: DatasetLoader) -> None:
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} registered twice")
    _REGISTRY[name] = loader


def load_dataset(name: str, data_dir: str | Path | None = None) -> DatasetSplits:
    try:
        loader = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}") from None
    return loader(Path(data_dir) if data_dir is not None else None)
