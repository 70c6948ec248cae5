"""No sparsification: the dense baseline, run by the same loop."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from contsparse.masking import LayerSelection, owner_of
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
        # the layer's weight as it computes (parametrized or not)
        return {name: torch.ones_like(getattr(*owner_of(self.model, name)), dtype=torch.bool)
                for name in self.selection.select_tensors(self.model)}
