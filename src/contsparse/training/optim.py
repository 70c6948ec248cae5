"""Optimisers and learning-rate schedules, built from plain settings."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
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


def build_optimizer(params: Iterable[nn.Parameter], settings: OptimizerSettings,
                    step_scales: Mapping[nn.Parameter, float] | None = None,
                    fused_kernels: bool = True) -> torch.optim.Optimizer:
    """The optimiser, with PyTorch's fused kernels where they apply (a third faster on CPU;
    ``fused_kernels=False``: PyTorch's default, foreach, kernels).

    ``step_scales`` maps a parameter ``V`` that stands for ``c * W`` (a hardened CS weight with the
    mask's scale ``c`` folded in) to ``c``: it then gets the steps the optimiser would take on
    ``W`` itself (see :func:`scaled_group`), so training follows the same path as the reference
    code's, which keeps ``W`` and multiplies by ``c`` in every forward.
    """
    params = list(params)
    fused = _can_fuse(params) if fused_kernels else None
    if settings.name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {settings.name!r}; choose from {', '.join(OPTIMIZERS)}")
    scales = {p: float(c) for p, c in (step_scales or {}).items() if c != 1.0}
    plain = [p for p in params if p not in scales]
    groups = [{"params": plain}] if plain else []
    for c in sorted(set(scales.values())):
        scaled = [p for p in params if scales.get(p) == c]
        if scaled:
            groups.append({"params": scaled, **scaled_group(settings, c)})
    if settings.name == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            groups, lr=settings.lr, momentum=settings.momentum, nesterov=settings.nesterov and settings.momentum > 0,
            weight_decay=settings.weight_decay, fused=fused)
    elif settings.name == "adam":
        optimizer = torch.optim.Adam(groups, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
    else:
        optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
    for group in optimizer.param_groups:
        group["lr"] = settings.lr * group.setdefault("lr_factor", 1.0)
    return optimizer


def scaled_group(settings: OptimizerSettings, c: float) -> dict[str, float]:
    """Hyper-parameters under which steps on ``V = c * W`` equal ``c`` times the steps the
    optimiser takes on ``W`` (whose gradient is ``c`` times ``V``'s), exactly: SGD (momentum,
    Nesterov and L2 decay are linear) ``lr * c**2``, ``decay / c**2``; Adam (invariant to the
    gradient's scale but for ``eps``) ``lr * c``, ``eps / c``, L2 ``decay / c**2``; AdamW's
    decoupled decay ``decay / c``."""
    if settings.name == "sgd":
        return {"lr_factor": c * c, "weight_decay": settings.weight_decay / (c * c)}
    decay = settings.weight_decay / c if settings.name == "adamw" else settings.weight_decay / (c * c)
    return {"lr_factor": c, "eps": ADAM_EPS / c, "weight_decay": decay}


ADAM_EPS = 1e-8  # torch's default for Adam and AdamW


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
    """The schedule's rate, times each group's ``lr_factor`` (see :func:`build_optimizer`)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_factor", 1.0)
