"""Model registry: a name -> builder taking the dataset's input shape and class count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

ModelBuilder = Callable[[tuple[int, ...], int], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: ModelBuilder
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, description: str) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator adding a builder ``(input_shape, num_classes) -> nn.Module`` to the registry."""

    def add(build: ModelBuilder) -> ModelBuilder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = ModelSpec(name, build, description)
        return build

    return add


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; available: {', '.join(available_models())}") from None


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a registered model for inputs of ``input_shape`` (without batch) and ``num_classes``."""
    return model_spec(name).build(tuple(input_shape), num_classes)
