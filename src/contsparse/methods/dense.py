"""No sparsification: the dense baseline, run by the same loop."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contsparse.masking import LayerSelection
from contsparse.methods.base import Method


class Dense(Method):
    name = "dense"

    def __init__(self, selection: LayerSelection | None = None) -> None:
        self.selection = selection or LayerSelection()
        self.model: nn.Module | None = None

    def attach(self, model: nn.Module) -> None:
        self.model = model

    def harden(self) -> None:
        pass

    def final_mask(self) -> dict[str, Tensor]:
        assert self.model is not None
        def tensor(name: str) -> Tensor:  # the layer's weight as it computes (parametrized or not)
            module_name, _, attr = name.rpartition(".")
            return getattr(self.model.get_submodule(module_name), attr)

        return {name: torch.ones_like(tensor(name), dtype=torch.bool)
                for name in self.selection.select_tensors(self.model)}
