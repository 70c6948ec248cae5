"""The baselines that keep a hard mask all along: IMP with rewinding, one-shot magnitude pruning,
random pruning, and gradual magnitude pruning (GMP). Masks are the same hard masks CS tickets
use (folded into the weights, pruned entries re-zeroed after every step), so weights remaining is
counted the same way for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from contsparse.masking import LayerSelection, MaskSet, attach_masks
from contsparse.methods.base import Method
from contsparse.seeds import seeded_generator


@dataclass(frozen=True)
class PruneSettings:
    """``fraction``: share of the remaining weights IMP prunes per round (``last_fraction`` for the
    output layer, ``conv_fraction`` for conv layers when given; LeNet: 0.2 and 0.1; Frankle &
    Carbin's Conv-2/4: 0.2 / 0.1 / 0.1, Conv-6: 0.2 / 0.1 / 0.15). ``sparsity``: target fraction
    pruned (magnitude, random, GMP). ``scope``: rank weights per layer (``layerwise``) or across
    all layers (``global``, at ``fraction``)."""

    fraction: float = 0.2
    last_fraction: float = 0.1
    conv_fraction: float | None = None  # None: conv layers take ``fraction`` like hidden Linear layers
    sparsity: float = 0.9
    scope: str = "layerwise"
    seed: int = 0
    epochs_per_round: int = 1
    steps_per_epoch: int = 1
    gmp_frequency: int = 100  # GMP: steps between pruning steps
    gmp_start_epoch: int = 0  # GMP: epoch at which pruning starts
    str_init: float = -5.0  # STR: initial threshold logit (sigmoid(-5) = 0.0067)
    selection: LayerSelection = field(default_factory=LayerSelection)


class HardMaskMethod(Method):
    """Masks are hard from the start (all ones); subclasses decide when and what to prune."""

    def output_tensors(self) -> set[str]:
        """The masked tensors of the output layer (the last candidate layer), which IMP prunes at
        ``last_fraction``; empty when that layer is not masked."""
        layers = self.settings.selection.candidates(self.mask_set.model)
        return {name for name in self.mask_set.masks if layers and name.rpartition(".")[0] == layers[-1]}

    def round_fractions(self) -> dict[str, float]:
        """IMP's layerwise share pruned per round, per masked tensor: ``last_fraction`` for the
        output layer, ``conv_fraction`` (when given) for conv layers, ``fraction`` for the rest."""
        settings, output = self.settings, self.output_tensors()
        conv = settings.fraction if settings.conv_fraction is None else settings.conv_fraction

        def rate(name: str) -> float:
            if name in output:
                return settings.last_fraction
            module, _ = self.mask_set.places(name)[0]
            return conv if isinstance(module, nn.modules.conv._ConvNd) else settings.fraction

        return {name: rate(name) for name in self.mask_set.masks}

    rewind_between_rounds = False
    fresh_optimizers_each_round = False

    def __init__(self, settings: PruneSettings) -> None:
        self.settings = settings
        self.masks: MaskSet | None = None

    def attach(self, model: nn.Module) -> None:
        self.masks = attach_masks(model, 1.0, scale_by_init=False, selection=self.settings.selection)
        self.masks.harden()  # all ones, no scale: the model is unchanged

    @property
    def mask_set(self) -> MaskSet:
        if self.masks is None:
            raise RuntimeError("attach() the method to a model first")
        return self.masks

    def weight_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self.mask_set.weight_parameters()

    def after_step(self, round_index: int, epoch: int, step: int) -> None:
        self.mask_set.zero_pruned()

    def after_hard_step(self) -> None:
        self.mask_set.zero_pruned()

    def after_rewind(self) -> None:
        self.mask_set.zero_pruned()

    def harden(self) -> None:
        pass  # already hard

    def final_mask(self) -> dict[str, Tensor]:
        return self.mask_set.binary_masks()

    def progress(self) -> dict[str, str]:
        return {"kept": f"{self.mask_set.weights_remaining():.4f}"}

    # -- pruning ------------------------------------------------------------------------------
    def _weights(self) -> dict[str, Tensor]:
        return {name: w.detach() for name, w in self.mask_set.masked_weights().items()}

    def prune_by_magnitude(self, fractions: dict[str, float] | None = None, target: float | None = None) -> None:
        """Prune the smallest weights: ``fractions`` of each layer's remaining ones, or down to a
        ``target`` fraction pruned (of each layer, or of all layers with ``scope="global"``)."""
        weights, current = self._weights(), self.mask_set.binary_masks()
        if self.settings.scope == "global":
            if target is None:
                kept = sum(int(m.sum()) for m in current.values())
                target = 1 - (1 - next(iter(fractions.values()))) * kept / sum(m.numel() for m in current.values())
            scores = torch.cat([torch.where(current[n], weights[n].abs(), -1.0).flatten() for n in weights])
            # exactly keep_count weights, ties at the threshold included (a threshold keeps them all)
            keep = _top(scores, round((1 - target) * scores.numel()))
            parts = keep.split([weights[n].numel() for n in weights])
            self.mask_set.set_hard_masks({n: part.view_as(current[n]) & current[n]
                                          for n, part in zip(weights, parts, strict=True)})
            return
        new = {}
        for name, weight in weights.items():
            keep = current[name]
            if target is not None:
                keep_count = round((1 - target) * keep.numel())
            else:
                keep_count = round(int(keep.sum()) * (1 - fractions[name]))
            scores = torch.where(keep, weight.abs(), -1.0).flatten()
            new[name] = _top(scores, keep_count).view_as(keep)
        self.mask_set.set_hard_masks(new)


def _top(scores: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest scores (ties broken by position, so exactly ``k``)."""
    keep = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        keep[torch.topk(scores, min(k, scores.numel())).indices] = True
    return keep


class IterativeMagnitudePruning(HardMaskMethod):
    """IMP with weight rewinding (Frankle & Carbin 2019; Frankle et al. 2020): each round trains
    the current mask from the rewind point, then prunes ``fraction`` of the remaining weights by
    magnitude (``last_fraction`` in the output layer). Every round's trained network is a ticket
    at its sparsity, so one run gives a whole sparsity-accuracy curve."""

    name = "imp"
    rewind_between_rounds = True
    fresh_optimizers_each_round = True
    records_round_tickets = True

    def end_of_round(self, round_index: int, last: bool) -> None:
        # The output layer's rate goes to the output layer only: when it is not masked (e.g.
        # --exclude-last) every masked layer is a hidden one. Global pruning ranks all layers
        # together at ``fraction`` (as open_lth does).
        if self.settings.scope == "layerwise":
            fractions = self.round_fractions()
        else:
            fractions = dict.fromkeys(self.mask_set.masks, self.settings.fraction)
        self.prune_by_magnitude(fractions=fractions)


class MagnitudePruning(HardMaskMethod):
    """One-shot magnitude pruning to ``sparsity`` after the (dense) search round."""

    name = "magnitude"

    def end_of_round(self, round_index: int, last: bool) -> None:
        if last:
            self.prune_by_magnitude(target=self.settings.sparsity)


class GivenMask(HardMaskMethod):
    """Train a saved mask (open_lth's branches): with ``--reinit`` from a fresh initialisation,
    Frankle & Carbin's control for a ticket found by another run (e.g. any of IMP's rounds); else
    from this run's initialisation at ``--seed`` (iteration 0). There is no search: the run is the
    ticket training alone."""

    name = "given"
    trains_from_initialisation = True

    def __init__(self, settings: PruneSettings, masks: dict[str, Tensor]) -> None:
        super().__init__(settings)
        self.given = masks

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        masks = self.mask_set.masks
        missing, unknown = sorted(set(masks) - set(self.given)), sorted(set(self.given) - set(masks))
        if missing or unknown:
            raise ValueError("the given masks do not fit this model's masked layers: "
                             + (f"none for {', '.join(missing)}" if missing else f"no layer {', '.join(unknown)}"))
        self.mask_set.set_hard_masks(self.given)


class RandomPruning(HardMaskMethod):
    """Control: a random mask with ``sparsity`` overall, drawn after the search round, with IMP's
    per-layer proportions: a layer IMP prunes at rate ``f`` keeps ``k ** a`` of its weights where
    the hidden layers keep ``k``, ``a = log(1 - f) / log(1 - fraction)``, as IMP's layerwise
    schedule leaves them (LeNet: 0.8 ** r and, in the output layer, 0.9 ** r after r rounds). At
    IMP's sparsities the control then matches IMP's tickets layer by layer, instead of starving
    the output layer."""

    name = "random"

    def end_of_round(self, round_index: int, last: bool) -> None:
        if not last:
            return
        generator = seeded_generator(self.settings.seed + 7919)
        current = self.mask_set.binary_masks()
        kept = self._kept_fractions({name: keep.numel() for name, keep in current.items()})
        new = {}
        for name, keep in current.items():
            scores = torch.rand(keep.numel(), generator=generator).to(keep.device)
            new[name] = _top(scores, round(kept[name] * keep.numel())).view_as(keep)
        self.mask_set.set_hard_masks(new)

    def _kept_fractions(self, sizes: dict[str, int]) -> dict[str, float]:
        settings = self.settings
        target = 1 - settings.sparsity
        rates = self.round_fractions()
        if not 0 < settings.fraction < 1 or not all(0 <= r < 1 for r in rates.values()) or target in (0.0, 1.0):
            return dict.fromkeys(sizes, target)
        exponents = {name: math.log1p(-rates[name]) / math.log1p(-settings.fraction) for name in sizes}
        if len(set(exponents.values())) == 1:  # every layer at one rate: uniform
            return dict.fromkeys(sizes, target)
        total = sum(sizes.values())

        def kept_overall(k: float) -> float:
            return sum(n * k ** exponents[name] for name, n in sizes.items()) / total

        if kept_overall(0.0) > target:  # layers IMP never prunes (a rate of 0) alone keep more
            return dict.fromkeys(sizes, target)
        low, high = 0.0, 1.0  # kept_overall rises with k: bisect for the target
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if kept_overall(middle) < target else (low, middle)
        k = (low + high) / 2
        return {name: k ** exponents[name] for name in sizes}


class GradualMagnitudePruning(HardMaskMethod):
    """GMP (Zhu & Gupta 2017): from step ``t0`` (epoch ``gmp_start_epoch``) the sparsity rises as
    ``s_t = s_f * (1 - (1 - (t - t0) / (T - t0)) ** 3)``, pruning by magnitude every
    ``gmp_frequency`` steps and reaching ``sparsity`` at ``T``, 3/4 of the round; the rest of the
    round trains at that sparsity."""

    name = "gmp"

    def __init__(self, settings: PruneSettings) -> None:
        super().__init__(settings)
        self.start, self.end = self.window(settings)

    MIN_PRUNING_STEPS = 4  # fewer, and the first cut already takes most of the target: pruning in one shot

    def check_schedule(self) -> None:
        settings = self.settings
        window = self.end - self.start
        steps = -(-window // settings.gmp_frequency)  # every gmp_frequency steps, and at the window's end
        if steps < self.MIN_PRUNING_STEPS:
            fastest = (window - 1) // (self.MIN_PRUNING_STEPS - 1)  # the largest f with ceil(window / f) >= 4
            fix = (f"give a gmp_frequency (--gmp-frequency) of at most {fastest}" if fastest >= 1 else
                   "train more epochs, or take smaller batches (more steps per epoch)")
            raise ValueError(f"gmp_frequency = {settings.gmp_frequency} leaves {steps} pruning step(s) in GMP's window "
                             f"of {window} steps (epoch {settings.gmp_start_epoch} to 3/4 of "
                             f"{settings.epochs_per_round} epochs of {settings.steps_per_epoch} steps), fewer than "
                             f"{self.MIN_PRUNING_STEPS}: close to one-shot magnitude pruning, not gradual; {fix}")

    @staticmethod
    def window(settings: PruneSettings) -> tuple[int, int]:
        """The steps ``(t0, T)`` of the round between which the sparsity rises."""
        end = max(1, int(0.75 * settings.epochs_per_round * settings.steps_per_epoch))
        return min(settings.gmp_start_epoch * settings.steps_per_epoch, end - 1), end

    def after_step(self, round_index: int, epoch: int, step: int) -> None:
        settings = self.settings
        t = epoch * settings.steps_per_epoch + step + 1
        since = t - self.start
        if round_index == 0 and since > 0 and t <= self.end and (since % settings.gmp_frequency == 0 or t == self.end):
            self.prune_by_magnitude(target=settings.sparsity * (1 - (1 - since / (self.end - self.start)) ** 3))
        else:
            self.mask_set.zero_pruned()
