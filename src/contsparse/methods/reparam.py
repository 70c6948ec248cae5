"""Baselines that learn sparsity through a reparametrised weight: STR and DNW.

* **STR** (Kusupati et al. 2020, soft threshold reparametrisation): each layer uses
  ``sign(W) * relu(|W| - sigmoid(s))`` with one learnable threshold logit ``s`` per layer, trained
  with the weights (weight decay on ``s`` too); sparsity emerges from the thresholds.
* **DNW** (Wortsman et al. 2019, discovering neural wirings): each layer uses only its ``k``
  largest-magnitude weights (``k`` from ``--sparsity``); the gradient passes straight through to
  all weights, so pruned ones can come back.

At the end of the search round the mask is fixed (``|W| > sigmoid(s)``, or the top ``k``) in the
same hard masks every method uses; ``harden`` takes the reparametrisation off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from contsparse.masking import owner_of, weights_remaining
from contsparse.methods.magnitude import HardMaskMethod, PruneSettings, _top


class SoftThreshold(nn.Module):
    """STR's ``S(W, s) = sign(W) * relu(|W| - sigmoid(s))``."""

    def __init__(self, threshold_logit: float) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(float(threshold_logit)))

    def forward(self, weight: Tensor) -> Tensor:
        return torch.sign(weight) * torch.relu(weight.abs() - torch.sigmoid(self.threshold))

    def keep(self, weight: Tensor) -> Tensor:
        return weight.abs() > torch.sigmoid(self.threshold)


class _TopKStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: Tensor, k: int) -> Tensor:  # type: ignore[override]
        return weight * _top(weight.detach().abs().flatten(), k).view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None  # straight through: every weight gets its gradient


class TopK(nn.Module):
    """DNW's forward: only the ``k`` largest-magnitude weights."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, weight: Tensor) -> Tensor:
        return _TopKStraightThrough.apply(weight, self.k)

    def keep(self, weight: Tensor) -> Tensor:
        return _top(weight.detach().abs().flatten(), self.k).view_as(weight)


class _Reparametrised(HardMaskMethod):
    _fixed = False  # end_of_round(last) has folded the mask into the weights

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.model = model
        for name in self.mask_set.masks:
            places = self.mask_set.places(name)
            reparametrisation = self._reparametrisation(getattr(*places[0]))
            for module, attr in places:  # a tied weight: the same reparametrisation wherever it is used
                parametrize.register_parametrization(module, attr, reparametrisation)

    def _reparametrisation(self, weight: Tensor) -> nn.Module:
        raise NotImplementedError

    def _parametrised(self) -> dict[str, tuple[nn.Module, str]]:
        found = {}
        for name in self.mask_set.masks:
            module, attr = owner_of(self.model, name)
            if parametrize.is_parametrized(module, attr):
                found[name] = (module, attr)
        return found

    def weight_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def after_step(self, round_index: int, epoch: int, step: int) -> None:
        if not self._parametrised():  # a later round under the fixed mask
            self.mask_set.zero_pruned()

    def progress(self) -> dict[str, str]:
        # during the search the stored hard masks are all ones: the kept weights are the live ones
        return {"kept": f"{weights_remaining(self.final_mask()):.4f}"}

    def final_mask(self) -> dict[str, Tensor]:
        live = self._parametrised()
        if not live or self._fixed:  # the last round has fixed the mask (the weights are thresholded)
            return self.mask_set.binary_masks()
        masks = self.mask_set.binary_masks()
        for name, (module, attr) in live.items():
            plist = module.parametrizations[attr]
            masks[name] = plist[0].keep(plist.original.detach())
        return masks

    def end_of_round(self, round_index: int, last: bool) -> None:
        if not last:
            return
        keep = self.final_mask()
        with torch.no_grad():
            for name, (module, attr) in self._parametrised().items():
                plist = module.parametrizations[attr]
                self._fold(plist[0], plist.original)
                self.mask_set.masks[name].hard_mask.copy_(keep[name])
        self._fixed = True

    def _fold(self, reparametrisation: nn.Module, weight: nn.Parameter) -> None:
        """What the trained weight becomes once the mask is fixed (before any rewind)."""

    def harden(self) -> None:
        for name in self._parametrised():
            for module, attr in self.mask_set.places(name):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        self.mask_set.zero_pruned()  # the same Parameter objects are the layers' weights again


class SoftThresholdReparametrization(_Reparametrised):
    name = "str"

    def _reparametrisation(self, weight: Tensor) -> nn.Module:
        return SoftThreshold(self.settings.str_init).to(weight.device)

    def _fold(self, reparametrisation: nn.Module, weight: nn.Parameter) -> None:
        weight.copy_(reparametrisation(weight))  # STR's weights are the thresholded ones


class DiscoveringNeuralWirings(_Reparametrised):
    name = "dnw"

    def _reparametrisation(self, weight: Tensor) -> nn.Module:
        return TopK(round((1 - self.settings.sparsity) * weight.numel()))


__all__ = ["DiscoveringNeuralWirings", "PruneSettings", "SoftThresholdReparametrization"]
