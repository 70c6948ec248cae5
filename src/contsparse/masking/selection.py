"""Which weight tensors of a model get a mask."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerSelection:
    """Rules that pick prunable layers; the weight of each picked layer gets a mask.

    ``include`` / ``exclude`` are regular expressions matched (``re.search``) against the module's
    qualified name, e.g. ``"features"`` or ``r"^fc\\d$"``. Biases and norm parameters are never
    masked: they are few and pruning them does not make a model smaller.
    """

    layer_types: tuple[type[nn.Module], ...] = DEFAULT_LAYER_TYPES
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    exclude_first: bool = False
    exclude_last: bool = False

    def candidates(self, model: nn.Module) -> list[str]:
        """Qualified names of the modules of ``layer_types`` with a weight, in registration order:
        the first and the last of them are the input and output layers."""
        return [name for name, module in model.named_modules()
                if isinstance(module, self.layer_types) and isinstance(getattr(module, "weight", None), Tensor)]

    def select(self, model: nn.Module) -> list[str]:
        """Qualified names of the selected modules, in registration order."""
        candidates = self.candidates(model)
        if self.exclude_first and candidates:
            candidates = candidates[1:]
        if self.exclude_last and candidates:
            candidates = candidates[:-1]
        include = [re.compile(p) for p in self.include]
        exclude = [re.compile(p) for p in self.exclude]
        return [name for name in candidates
                if (not include or any(p.search(name) for p in include))
                and not any(p.search(name) for p in exclude)]
