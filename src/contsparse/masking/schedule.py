"""Temperature (``beta``) schedule of one CS round."""

from __future__ import annotations

import math
import numbers
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
    ``final`` at its last step). Annealing over steps needs ``steps_per_epoch`` (e.g.
    ``len(loader)``): a step index beyond it is refused rather than read as a later epoch.
    """

    final: float = 200.0
    epochs: int = 10
    per: Literal["epoch", "step"] = "epoch"
    steps_per_epoch: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.final, bool) or not isinstance(self.final, numbers.Real) \
                or not (math.isfinite(self.final) and self.final > 1):
            raise ValueError(f"final temperature must be a finite number > 1, got {self.final!r}")
        for name in ("epochs", "steps_per_epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.per not in ("epoch", "step"):
            raise ValueError(f"per must be 'epoch' or 'step', got {self.per!r}")
        # Python numbers from here on: numpy's small integer types would overflow in value()
        for name, kind in (("final", float), ("epochs", int), ("steps_per_epoch", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    @property
    def changes_every_step(self) -> bool:
        return self.per == "step" or self.epochs == 1

    def value(self, epoch: int, step: int = 0) -> float:
        """Temperature during ``step`` (0-based, within the epoch) of ``epoch`` (0-based);
        ``step = steps_per_epoch`` is the next epoch's start."""
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be a whole number >= 0 (0-based), got {epoch!r}")
        if self.changes_every_step:
            if not 0 <= step <= self.steps_per_epoch:  # steps_per_epoch itself: the next epoch's start
                raise ValueError(f"step {step} of an epoch of steps_per_epoch={self.steps_per_epoch} steps: pass "
                                 "TemperatureSchedule(steps_per_epoch=len(loader)) to anneal over steps")
            progress, span = epoch * self.steps_per_epoch + step, self.epochs * self.steps_per_epoch - 1
        else:
            progress, span = epoch, self.epochs - 1
        if span <= 0:
            return 1.0  # a round of one step: it starts at 1, as every round does
        return self.final ** (min(progress, span) / span)
