"""Optimisers and learning-rate schedules, built from plain settings."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class OptimizerSettings:
    """One optimiser and its per-epoch learning-rate schedule.

    ``schedule``: ``constant``; ``step`` (multiply by ``gamma`` at each epoch in ``milestones``);
    ``cosine`` (from ``lr`` towards 0: ``lr * (1 + cos(pi * epoch / epochs)) / 2``, reaching 0
    just after the phase's last epoch).
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    schedule: str = "constant"
    milestones: Sequence[int] = field(default_factory=tuple)
    gamma: float = 0.1


OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine")


def build_optimizer(params: Iterable[nn.Parameter], settings: OptimizerSettings) -> torch.optim.Optimizer:
    """The optimiser, with PyTorch's fused kernels where they apply (a third faster on CPU)."""
    params = list(params)
    fused = _can_fuse(params)
    if settings.name == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               nesterov=settings.nesterov and settings.momentum > 0,
                               weight_decay=settings.weight_decay, fused=fused)
    if settings.name == "adam":
        return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
    if settings.name == "adamw":
        return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
    raise ValueError(f"unknown optimizer {settings.name!r}; choose from {', '.join(OPTIMIZERS)}")


def _can_fuse(params: list[nn.Parameter]) -> bool | None:
    return True if params and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
                                  for p in params) else None


def learning_rate(settings: OptimizerSettings, epoch: int, epochs: int) -> float:
    """The learning rate during ``epoch`` (0-based) of a phase of ``epochs`` epochs."""
    if settings.schedule == "constant":
        return settings.lr
    if settings.schedule == "step":
        drops = sum(1 for milestone in settings.milestones if epoch >= milestone)
        return settings.lr * settings.gamma ** drops
    if settings.schedule == "cosine":
        return 0.5 * settings.lr * (1 + math.cos(math.pi * epoch / max(epochs, 1)))
    raise ValueError(f"unknown schedule {settings.schedule!r}; choose from {', '.join(SCHEDULES)}")


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
