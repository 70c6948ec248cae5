"""The one training loop every method runs on: epochs of steps, evaluation, progress."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from contsparse.data.splits import BatchIterator
from contsparse.errors import UserError


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    regularizer: float = 0.0


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops instead of training on garbage."""


def train_epoch(model: nn.Module, batches: BatchIterator, optimizers: Sequence[torch.optim.Optimizer], *,
                device: torch.device, regularizer: Callable[[], Tensor] | None = None,
                after_step: Callable[[int], None] | None = None,
                postfix: Callable[[], dict[str, str]] | None = None, desc: str = "train") -> EpochResult:
    """One pass over ``batches``: cross-entropy (+ ``regularizer()``), backward, every optimiser steps.

    ``after_step(step)`` runs after the optimisers (temperature updates, re-zeroing pruned weights).
    """
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    reg_value = 0.0
    seen = 0
    bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5, disable=None)
    for step, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        logits = _forward(model, x)
        loss = F.cross_entropy(logits, y)
        if regularizer is not None:
            reg = regularizer()
            reg_value = float(reg.detach()) if step % 50 == 0 else reg_value
            (loss + reg).backward()
        else:
            loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        if after_step is not None:
            after_step(step)
        total_loss += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if step % 50 == 0:
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {float(loss)} at step {step}")
            if postfix is not None:
                bar.set_postfix(postfix(), refresh=False)
    if seen == 0:
        raise UserError("the training split is empty")
    mean_loss = float(total_loss) / seen
    if not torch.isfinite(torch.tensor(mean_loss)):
        raise NonFiniteLossError(f"mean training loss is {mean_loss}")
    return EpochResult(mean_loss, float(correct) / seen, reg_value)


@torch.no_grad()
def evaluate(model: nn.Module, batches: BatchIterator, device: torch.device) -> EpochResult:
    """Mean cross-entropy and accuracy of ``model`` on ``batches`` (eval mode, no gradient)."""
    model.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = _forward(model, x)
        total_loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    if seen == 0:
        return EpochResult(float("nan"), float("nan"))
    return EpochResult(float(total_loss) / seen, float(correct) / seen)


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    """Forward pass that turns shape and label mistakes into errors a user can act on."""
    try:
        logits = model(x)
    except RuntimeError as err:
        if "shape" in str(err) or "size" in str(err):
            raise UserError(f"the model cannot take inputs of shape {tuple(x.shape[1:])}: {err}") from err
        raise
    if logits.ndim != 2:
        raise UserError(f"the model returned outputs of shape {tuple(logits.shape)}; expected (batch, classes)")
    return logits
