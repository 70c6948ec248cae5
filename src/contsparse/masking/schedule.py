"""Temperature (``beta``) schedule of one CS round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TemperatureSchedule:
    """Exponential annealing from 1 to ``final`` within one round.

    ``per="epoch"`` (the reference): ``beta = final ** (epoch / (epochs - 1))``, i.e. multiplied by
    ``final ** (1 / (epochs - 1))`` after every epoch, reaching ``final`` in the last epoch.
    ``per="step"``: the same curve sampled at every optimiser step, which hardens the mask more
    smoothly when rounds are only a few epochs long. A round of a single epoch has no epochs to
    anneal over, so it anneals over its steps whatever ``per`` says (``beta = 1`` at its start,
    ``final`` at its last step).
    """

    final: float = 200.0
    epochs: int = 10
    per: Literal["epoch", "step"] = "epoch"
    steps_per_epoch: int = 1

    def __post_init__(self) -> None:
        if not self.final > 1:
            raise ValueError(f"final temperature must be > 1, got {self.final}")
        if self.epochs < 1 or self.steps_per_epoch < 1:
            raise ValueError("epochs and steps_per_epoch must be >= 1")

    @property
    def changes_every_step(self) -> bool:
        return self.per == "step" or self.epochs == 1

    def value(self, epoch: int, step: int = 0) -> float:
        """Temperature during ``step`` (0-based, within the epoch) of ``epoch`` (0-based)."""
        if self.changes_every_step:
            progress, span = epoch * self.steps_per_epoch + step, self.epochs * self.steps_per_epoch - 1
        else:
            progress, span = epoch, self.epochs - 1
        if span <= 0:
            return 1.0  # a round of one step: it starts at 1, as every round does
        return self.final ** (min(progress, span) / span)
