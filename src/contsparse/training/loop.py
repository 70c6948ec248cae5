"""The one training loop every method runs on: epochs of steps, evaluation, progress."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from contsparse.data.splits import BatchIterator, ShareOfBatch
from contsparse.errors import UserError, raised_by_torch_compile


@dataclass
class StepSettings:
    """How each step runs: this process's share of the batch under data parallelism
    (``shard = (rank, world_size)``, with ``all_sum`` summing epoch totals over the processes),
    bfloat16 autocast, and channels-last inputs (both pay on GPUs)."""

    shard: tuple[int, int] | None = None
    all_sum: Callable[[list[float]], list[float]] | None = None
    amp: bool = False
    channels_last: bool = False

    def prepare(self, batch: tuple[Tensor, Tensor] | ShareOfBatch,
                device: torch.device) -> tuple[Tensor, Tensor, int]:
        """This process's share of ``batch`` on ``device``, and the whole batch's size."""
        if isinstance(batch, ShareOfBatch):  # the iterator loaded only this process's share
            x, y, global_size = batch
        else:
            x, y = batch
            global_size = len(y)
            if self.shard is not None:
                rank, world = self.shard
                x, y = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y, global_size

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp)


@dataclass
class EpochResult:
    loss: float
    accuracy: float
    regularizer: float = 0.0
    steps: int = 0
    complete: bool = True  # False: stopped early on request (an interrupt); see ``totals``
    totals: dict[str, Tensor] | None = None  # running sums to resume a stopped epoch from


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops instead of training on garbage."""


def train_epoch(model: nn.Module, batches: BatchIterator, optimizers: Sequence[torch.optim.Optimizer], *,
                device: torch.device, regularizer: Callable[[], Tensor] | None = None,
                reported_regularizer: Callable[[], Tensor | None] | None = None,
                after_step: Callable[[int], None] | None = None,
                postfix: Callable[[], dict[str, str]] | None = None, desc: str = "train",
                resume: dict[str, Tensor] | None = None,
                should_stop: Callable[[], bool] | None = None,
                speed: StepSettings | None = None) -> EpochResult:
    """One pass over ``batches``: cross-entropy (+ ``regularizer()``), backward, every optimiser steps.

    The regularizer's value is recorded every 50 steps: ``regularizer()``'s, or, for a penalty whose
    gradient is applied elsewhere, ``reported_regularizer()``'s (asked only on those steps: a
    penalty over every weight costs a pass over all of them).

    ``after_step(step)`` runs after the optimisers (temperature updates, re-zeroing pruned weights).
    ``should_stop()`` is asked after every whole step (under data parallelism every ``CHECK_EVERY``
    steps, where the processes agree); when it says yes the epoch ends early with
    ``complete=False`` and ``totals``, which ``resume`` takes to finish the epoch later exactly as
    if it had not stopped. ``speed`` sets data-parallel sharding, autocast and memory format.
    """
    speed = speed or StepSettings()
    model.train()
    # A resumed epoch's sums are added once: by the first process, since the processes' totals
    # are summed at the end (a run stopped on one process may resume on several)
    totals = _start_totals(resume, device, with_sums=speed.shard is None or speed.shard[0] == 0)
    first = int(totals["steps"])
    bar = tqdm(batches.iterate(first), desc=desc, total=len(batches), initial=first, leave=False,
               dynamic_ncols=True, mininterval=0.5, disable=None)
    for step, batch in enumerate(bar, start=first):
        x, y, global_size = speed.prepare(batch, device)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        with speed.autocast(device):
            logits = _forward(model, x)
            loss = _cross_entropy(logits, y) if speed.shard is None else (
                # this process's share of the global batch's mean: DDP's averaging over the
                # processes then gives exactly the one-process gradient
                _cross_entropy(logits, y, "sum") * (speed.shard[1] / global_size))
        reg = regularizer() if regularizer is not None else None
        if step % 50 == 0:
            reported = reg if reg is not None else reported_regularizer() if reported_regularizer is not None else None
            if reported is not None:
                totals["regularizer"] = reported.detach().to(totals["regularizer"].dtype)
        (loss if reg is None else loss + reg).backward()
        for optimizer in optimizers:
            optimizer.step()
        if after_step is not None:
            after_step(step)
        totals["loss"] += loss.detach().float() * (len(y) if speed.shard is None else global_size / speed.shard[1])
        totals["correct"] += (logits.detach().argmax(1) == y).sum()
        totals["seen"] += len(y)
        totals["steps"] += 1
        stop = False
        if step % CHECK_EVERY == 0:
            stop = _check_processes(loss, step, speed.all_sum, should_stop)
            if postfix is not None:
                bar.set_postfix(postfix(), refresh=False)
        if speed.all_sum is None:  # one process: a stop request is honoured after any step
            stop = should_stop is not None and should_stop()
        if stop and step + 1 < len(batches):
            bar.close()
            if speed.all_sum is not None:
                # The first process saves the stopped epoch's totals and alone adds them back on
                # resuming (see _start_totals): they are every process's sums
                _sum_over_processes(totals, speed.all_sum)
            return EpochResult(float("nan"), float("nan"), steps=step + 1, complete=False,
                               totals={k: v.cpu() for k, v in totals.items()})
    if speed.all_sum is not None:  # every process saw its own share of the batches
        _sum_over_processes(totals, speed.all_sum)
    seen = int(totals["seen"])
    if seen == 0:
        raise UserError("the training split is empty")
    mean_loss = float(totals["loss"]) / seen
    if not math.isfinite(mean_loss):
        raise NonFiniteLossError(f"mean training loss is {mean_loss}")
    return EpochResult(mean_loss, float(totals["correct"]) / seen, float(totals["regularizer"]),
                       steps=int(totals["steps"]))


CHECK_EVERY = 50  # steps between the checks that read the loss (a GPU sync; a collective under DDP)


def _check_processes(loss: Tensor, step: int, all_sum: Callable[[list[float]], list[float]] | None,
                     should_stop: Callable[[], bool] | None) -> bool:
    """Stop on a NaN or infinite loss; under data parallelism also whether any process was asked
    to stop (returned). Both go through one all-reduce, so every process learns of a non-finite
    loss or a stop request anywhere at the same step: one process stopping alone would leave the
    others waiting in the next step's gradient all-reduce."""
    finite = bool(torch.isfinite(loss))
    stop = False
    if all_sum is not None:
        requested = should_stop is not None and should_stop()
        not_finite, stops = all_sum([0.0 if finite else 1.0, 1.0 if requested else 0.0])
        others = not_finite - (0.0 if finite else 1.0)
        if finite and others > 0:
            raise NonFiniteLossError(f"loss is not finite in {others:.0f} other process(es) at step {step}")
        stop = stops > 0
    if not finite:
        raise NonFiniteLossError(f"loss is {float(loss.detach())} at step {step}")
    return stop


def _start_totals(resume: dict[str, Tensor] | None, device: torch.device, with_sums: bool = True) -> dict[str, Tensor]:
    totals = {"loss": torch.zeros((), device=device), "correct": torch.zeros((), device=device, dtype=torch.long),
              "seen": torch.zeros((), dtype=torch.long), "steps": torch.zeros((), dtype=torch.long),
              "regularizer": torch.zeros((), device=device)}
    for key, value in (resume or {}).items():
        if with_sums or key not in SUMMED_OVER_PROCESSES:
            totals[key] = value.to(device=totals[key].device, dtype=totals[key].dtype).clone()
    return totals


SUMMED_OVER_PROCESSES = ("loss", "correct", "seen")  # what all_sum adds up at the end of an epoch


def _sum_over_processes(totals: dict[str, Tensor], all_sum: Callable[[list[float]], list[float]]) -> None:
    """Replace this process's epoch sums by every process's (a collective: all call it together)."""
    summed = all_sum([float(totals[key]) for key in SUMMED_OVER_PROCESSES])
    totals.update({key: torch.tensor(value, dtype=totals[key].dtype)
                   for key, value in zip(SUMMED_OVER_PROCESSES, summed, strict=True)})


@torch.no_grad()
def evaluate(model: nn.Module, batches: BatchIterator, device: torch.device,
             speed: StepSettings | None = None) -> EpochResult:
    """Mean cross-entropy and accuracy of ``model`` on ``batches`` (eval mode, no gradient).

    Under data parallelism every process evaluates whole in-memory batches (cheap, and the same
    result everywhere); batches served in shares (:class:`ShareOfBatch`, decoded images) are each
    evaluated by the process that loaded them, and the sums are added over the processes."""
    speed = speed or StepSettings()
    whole_batches = StepSettings(amp=speed.amp, channels_last=speed.channels_last)  # no slicing of batches
    model.eval()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, shared = 0, False
    for batch in batches:
        shared = shared or isinstance(batch, ShareOfBatch)
        x, y, _ = whole_batches.prepare(batch, device)
        with speed.autocast(device):
            logits = _forward(model, x).float()
        total_loss += _cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    loss_sum, correct_sum = float(total_loss), float(correct)
    if shared and speed.all_sum is not None:
        loss_sum, correct_sum, seen = speed.all_sum([loss_sum, correct_sum, float(seen)])
    if seen == 0:
        return EpochResult(float("nan"), float("nan"))
    return EpochResult(loss_sum / seen, correct_sum / seen)


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    """Forward pass that turns shape and label mistakes into errors a user can act on."""
    try:
        logits = model(x)
    except ValueError as err:
        if "Expected more than 1 value per channel when training" in str(err):  # BatchNorm, one value per channel
            raise UserError(f"a training batch of {len(x)} example(s) reached a normalisation layer with one value "
                            "per channel (a 1x1 feature map): choose a batch size (or --train-subset) that leaves no "
                            "last batch of 1, or larger inputs") from err
        raise
    except RuntimeError as err:
        if not raised_by_torch_compile(err) and ("shape" in str(err) or "size" in str(err)):
            raise UserError(f"the model cannot take inputs of shape {tuple(x.shape[1:])}: {err}") from err
        raise
    if logits.ndim != 2:
        raise UserError(f"the model returned outputs of shape {tuple(logits.shape)}; expected (batch, classes)")
    return logits


def _cross_entropy(logits: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy that names the problem when labels do not fit the model's outputs."""
    try:
        return F.cross_entropy(logits, y, reduction=reduction)
    except (IndexError, RuntimeError) as err:
        if "out of bounds" in str(err) or "out of range" in str(err):
            raise UserError(f"labels must be in [0, {logits.shape[1]}) for this model's {logits.shape[1]} outputs, "
                            f"but the data holds labels {int(y.min())}..{int(y.max())}; "
                            "check the dataset or the model's number of classes") from err
        raise
