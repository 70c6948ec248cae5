"""Data-parallel training under ``torchrun``: who is who, and the process group.

``torchrun --nproc_per_node N -m contsparse ticket ...`` starts N processes with ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` set; each trains on its share of every global batch (so for
models without batch norm the gradients are those of one process with the same ``--batch-size``;
batch-norm statistics are each rank's own, computed on its share, and rank 0's running
statistics are broadcast), DDP averages the gradients (mask logits included, so the penalty's
gradient is the same as in one process), and rank 0 alone writes the run directory, which every
process must see. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from contsparse.errors import UserError


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        return (self.rank, self.world_size) if self.enabled else None

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to train: DDP around ``model`` when distributed (rebuilt at each phase,
        because hardening changes which parameters get gradients)."""
        if not self.enabled:
            return model
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather(self, value: object) -> list[object]:
        """Every process's ``value`` (picklable), in rank order, on every process."""
        if not self.enabled:
            return [value]
        values: list[object] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def from_environment(device_name: str) -> Distributed:
    """Join the process group ``torchrun`` set up (no-op when not launched by it)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Distributed()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as err:
        raise UserError(f"WORLD_SIZE is set but the other torchrun variables are missing or malformed ({err}): "
                        "start data-parallel runs with torchrun, or unset WORLD_SIZE") from None
    if device_name.startswith("cuda:"):  # every process would take that one GPU
        raise UserError(f"--device {device_name} under torchrun: give --device cuda (each process then uses the GPU "
                        "of its local rank; choose the GPUs with CUDA_VISIBLE_DEVICES)")
    wants_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if wants_cuda:
        if not torch.cuda.is_available():
            raise UserError("--device cuda under torchrun, but no CUDA GPU is available")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started process {local_rank} on this machine, which has "
                            f"{torch.cuda.device_count()} visible CUDA GPU(s): give --nproc_per_node at most that")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if wants_cuda else "gloo")
    return Distributed(rank, world, local_rank)


def device_for(device_name: str, context: Distributed) -> str:
    """Under torchrun each process uses its own GPU (``cuda:LOCAL_RANK``)."""
    if context.enabled and (device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())):
        return f"cuda:{context.local_rank}"
    return device_name
