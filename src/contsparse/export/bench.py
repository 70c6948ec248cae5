"""Latency and throughput of a model, dense vs converted by :func:`to_sparse`, on this CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from contsparse.export.sparse import to_sparse
from contsparse.timing import interleaved_times


@dataclass
class InferenceTiming:
    batch_size: int
    dense_ms: float  # the plain model, as users run it
    inlined_dense_ms: float  # the to_sparse graph with dense kernels only: the gain of inlining alone
    sparse_ms: float
    sparse_layers: list[str]  # layers that run on CSR kernels at this batch size
    same_predictions: bool

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.sparse_ms

    def as_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup,
                "dense_images_per_s": self.batch_size / self.dense_ms * 1e3,
                "sparse_images_per_s": self.batch_size / self.sparse_ms * 1e3}


def time_inference(model: nn.Module, input_shape: tuple[int, ...], batch_sizes: tuple[int, ...] = (1, 256),
                   blocks: int = 15, budget_s: float = 0.05) -> list[InferenceTiming]:
    """Interleaved median latency of the dense model, its inlined-dense graph and its sparse
    conversion (chosen for each batch size); predictions are compared on the timing batch."""
    training = model.training
    try:
        model.eval()
        return [_time_batch(model, input_shape, batch_size, blocks, budget_s) for batch_size in batch_sizes]
    finally:
        model.train(training)  # the caller's model is left as it was


def _time_batch(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, blocks: int,
                budget_s: float) -> InferenceTiming:
    sparse = to_sparse(model, batch_size)
    inlined = to_sparse(model, batch_size, kernels="dense")
    x = torch.randn(batch_size, *input_shape)
    with torch.inference_mode():
        same = bool(torch.equal(model(x).argmax(1), sparse(x).argmax(1)))
        calls = _calls_per_block(lambda: model(x), budget_s)
        times = interleaved_times({"dense": lambda: model(x), "inlined": lambda: inlined(x),
                                   "sparse": lambda: sparse(x)}, blocks, calls, warmup=5)
    return InferenceTiming(batch_size, times["dense"] * 1e3, times["inlined"] * 1e3, times["sparse"] * 1e3,
                           sorted(k for k, v in sparse.kernel_choices.items() if v == "sparse"), same)


def _calls_per_block(call: Callable[[], object], budget_s: float) -> int:
    """Calls per timing block so that one block lasts about ``budget_s``, sized on warm calls: a
    first call can take a hundred times longer, which would leave blocks too short to time."""
    for _ in range(5):
        call()
    start = time.perf_counter()
    for _ in range(5):
        call()
    elapsed = max((time.perf_counter() - start) / 5, 1e-6)
    return max(1, min(2000, int(budget_s / elapsed)))
