"""Continuous Sparsification (Savarese et al., 2020) as a method of the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from contsparse.masking import LayerSelection, MaskSet, TemperatureSchedule, attach_masks
from contsparse.methods.base import Method


@dataclass(frozen=True)
class CSSettings:
    """CS hyper-parameters (DESIGN.md section 1).

    ``penalty`` is ``lambda`` in ``loss + lambda * sum(sigmoid(beta * s))``; with
    ``penalty_normalize`` the sum becomes a mean over all prunable weights, so ``lambda`` no longer
    depends on the model's size (sum-lambda = mean-lambda / number of weights).
    """

    mask_init: float = 0.0
    penalty: float = 1e-8
    penalty_normalize: bool = False
    final_temp: float = 200.0
    epochs_per_round: int = 10
    temp_schedule: str = "epoch"
    steps_per_epoch: int = 1
    scale_by_init: bool = True
    reference_steps: bool = True  # hardened weights take the steps the reference code's take (step_scales)
    selection: LayerSelection = field(default_factory=LayerSelection)


class ContinuousSparsification(Method):
    """Soft masks ``sigmoid(beta * s)`` learned with an L1 penalty while ``beta`` anneals to
    ``final_temp`` each round; ``s <- min(beta * s, s0)`` between rounds; ``H(s)`` at the end."""

    name = "cs"
    resets_at_round_end = True

    def __init__(self, settings: CSSettings) -> None:
        self.settings = settings
        self.schedule = TemperatureSchedule(settings.final_temp, settings.epochs_per_round,
                                            settings.temp_schedule, max(settings.steps_per_epoch, 1))
        self.masks: MaskSet | None = None
        self.last_used_temperature: float | None = None  # per-step schedule: the epoch's last step's

    def attach(self, model: nn.Module) -> None:
        self.masks = attach_masks(model, self.settings.mask_init, scale_by_init=self.settings.scale_by_init,
                                  selection=self.settings.selection)
        # The penalty's gradient is added inside the masks' backward pass (cheaper, same gradient):
        # no loss term; reported_penalty() gives its value for the metrics.
        self.masks.fuse_penalty(self.settings.penalty, self.settings.penalty_normalize)

    @property
    def mask_set(self) -> MaskSet:
        if self.masks is None:
            raise RuntimeError("attach() the method to a model first")
        return self.masks

    def search_parameters(self) -> list[nn.Parameter]:
        return self.mask_set.mask_parameters()

    def weight_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return self.mask_set.weight_parameters()

    def step_scales(self) -> dict[nn.Parameter, float]:
        return self.mask_set.folded_scales() if self.settings.reference_steps else {}

    def before_epoch(self, round_index: int, epoch: int, step: int = 0) -> None:
        self.mask_set.temperature = self.schedule.value(epoch, step)

    def after_step(self, round_index: int, epoch: int, step: int) -> None:
        if self.schedule.changes_every_step:
            self.last_used_temperature = self.mask_set.temperature
            self.mask_set.temperature = self.schedule.value(epoch, step + 1)

    def reported_penalty(self) -> Tensor | None:
        return self.settings.penalty * self.mask_set.penalty(self.settings.penalty_normalize).detach()

    def end_of_round(self, round_index: int, last: bool) -> None:
        if not last:
            self.mask_set.reset_logits()

    def harden(self) -> None:
        self.mask_set.fuse_penalty(0.0)
        self.mask_set.harden(warn_empty=False)  # a layer left empty: the run's log and per-layer table say so

    def after_hard_step(self) -> None:
        self.mask_set.zero_pruned()

    def final_mask(self) -> dict[str, Tensor]:
        return self.mask_set.binary_masks()

    def progress(self) -> dict[str, str]:
        masks = self.mask_set
        kept = {"kept": f"{masks.weights_remaining():.4f}"}
        return {"beta": f"{masks.temperature:.3g}", **kept} if masks.mode == "soft" else kept  # hard: no temperature

    def epoch_metrics(self) -> dict[str, float]:
        # a hard mask has no temperature: ticket and fine-tuning epochs carry none. A per-step
        # schedule has moved on to the next epoch's first value: the epoch logs its last step's.
        if self.mask_set.mode != "soft":
            return {}
        used = self.last_used_temperature if self.schedule.changes_every_step else None
        return {"temperature": used if used is not None else self.mask_set.temperature}
