"""The interface every sparsification method implements; the training loop calls these hooks."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn


class Method(ABC):
    """A sparsification method seen by the driver: hooks into the one training loop.

    Search happens in rounds of epochs; after the last round :meth:`final_mask` is the mask the
    ticket (or fine-tuned model) keeps.
    """

    name: str = "method"
    rewind_between_rounds = False  # IMP: every round restarts from the rewind point
    fresh_optimizers_each_round = False  # IMP: and with fresh optimisers
    records_round_tickets = False  # IMP: each round's trained network is a ticket worth testing
    resets_at_round_end = False  # CS: end_of_round prepares the next round; the round's mask is the one before
    trains_from_initialisation = False  # a given mask: no search, the ticket starts from iteration 0

    @abstractmethod
    def attach(self, model: nn.Module) -> None:
        """Prepare ``model`` (e.g. attach masks). Called once, before any state is loaded."""

    def search_parameters(self) -> list[nn.Parameter]:
        """Extra parameters the method learns during search (own optimiser, no weight decay)."""
        return []

    def weight_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The model parameters the weight optimiser trains."""
        return list(model.parameters())

    def step_scales(self) -> dict[nn.Parameter, float]:
        """Weights that stand for ``c`` times a parameter of the method's reference formulation
        (a CS mask's scale folded in): the optimiser gives them that parameter's steps."""
        return {}

    def check_schedule(self) -> None:
        """Refuse (``ValueError``) a schedule that the run's number of steps per epoch makes
        meaningless; called before a run starts, once that number is known."""

    def before_epoch(self, round_index: int, epoch: int, step: int = 0) -> None:
        """Start of a search epoch (``step > 0``: an epoch resumed after its first ``step`` steps)."""

    def after_step(self, round_index: int, epoch: int, step: int) -> None:
        """After every optimiser step of a search epoch."""

    def regularizer(self) -> Tensor | None:
        """Extra loss term of a search step, or None."""
        return None

    def reported_penalty(self) -> Tensor | None:
        """The penalty's value for the metrics when it is not a loss term (e.g. fused into the
        backward pass); asked only on the steps that log it."""
        return None

    @property
    def has_penalty(self) -> bool:
        """Whether search steps carry a penalty to log (a loss term, or one applied elsewhere)."""
        kind = type(self)
        return kind.regularizer is not Method.regularizer or kind.reported_penalty is not Method.reported_penalty

    def end_of_round(self, round_index: int, last: bool) -> None:
        """After the last epoch of search round ``round_index``."""

    @abstractmethod
    def harden(self) -> None:
        """Fix the final mask for ticket training / fine-tuning (pruned weights become zero)."""

    def after_rewind(self) -> None:
        """After the weights were rewound (e.g. re-zero what the mask prunes)."""

    def after_hard_step(self) -> None:
        """After every optimiser step under the fixed mask: keep pruned weights exactly zero."""

    @abstractmethod
    def final_mask(self) -> dict[str, Tensor]:
        """Name of each prunable weight -> bool mask of the weights kept."""

    def progress(self) -> dict[str, str]:
        """Short values for the progress bar."""
        return {}

    def epoch_metrics(self) -> dict[str, float]:
        """Values logged with every epoch."""
        return {}
