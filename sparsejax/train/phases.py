"""A run as a sequence of phases (:class:`~sparsejax.methods.base.Phase`): which phase trains
the next epoch, when the next phase begins, and the plan printed at start.

Phases begin at epoch boundaries. Where each begun phase started is part of the run's progress
record (``phase_starts``, epochs), checkpointed with it, so a resumed run is in the same phase
with the same optimizer state as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import optax

from sparsejax.errors import ConfigError
from sparsejax.methods.base import MethodState, Phase
from sparsejax.train.state import TrainState

PHASE_STARTS = "phase_starts"
"""Key of the progress record: the epoch at which each begun phase started."""


@dataclasses.dataclass(frozen=True)
class PhasePlan:
    """The phases of a run and the epoch arithmetic over them."""

    phases: tuple[Phase, ...]
    steps_per_epoch: int

    def __post_init__(self):
        if not self.phases or self.phases[0].optimizer is None:
            raise ValueError("a run's first phase needs an optimizer")
        for phase in self.phases:
            if phase.epochs < 0:
                raise ConfigError(
                    f"the {phase.name} phase would last {phase.epochs} epochs; give it 0 or more"
                )

    def optimizer(self, index: int) -> optax.GradientTransformation:
        """The optimizer in force in phase ``index``: its own, or the latest earlier one."""
        return next(
            phase.optimizer
            for phase in reversed(self.phases[: index + 1])
            if phase.optimizer is not None
        )

    def state_template(self, state: TrainState, progress: dict) -> TrainState:
        """``state`` (a run's initial train state) shaped like a checkpoint whose progress
        record is ``progress``: with the optimizer state of the phase it was in."""
        phase = len(progress.get(PHASE_STARTS, [0])) - 1
        optimizer = self.optimizer(phase)
        if optimizer is self.optimizer(0):
            return state
        return state.replace(opt_state=optimizer.init(state.params))

    def starts_optimizer(self, index: int) -> bool:
        """Whether phase ``index`` begins with a fresh optimizer state."""
        return self.phases[index].optimizer is not None

    def ended(
        self, index: int, started: int, epoch: int, method_state: Callable[[], MethodState]
    ) -> bool:
        """Whether phase ``index``, begun at epoch ``started``, is over at epoch ``epoch``:
        it has lasted its epochs, or its ``until`` holds for ``method_state()`` (host arrays,
        fetched only for a phase with a test)."""
        phase = self.phases[index]
        if epoch - started >= phase.epochs:
            return True
        return phase.until is not None and epoch > started and bool(phase.until(method_state()))

    def planned_epochs(self, starts: Sequence[int]) -> int:
        """The run's length as known when the phases begun started at ``starts``: the current
        phase and the later ones at their planned (longest) lengths."""
        current = len(starts) - 1
        return starts[current] + sum(phase.epochs for phase in self.phases[current:])

    def describe(self) -> str:
        """The plan in one line: each phase with its length and learning rate."""
        parts = []
        for phase in self.phases:
            if not phase.epochs:
                continue
            length = _epochs(phase.epochs)
            if phase.until is not None:
                length = f"at most {length}, ending when the method says so"
            steps = f"{phase.epochs * self.steps_per_epoch:,} steps"
            rate = f"; {phase.learning_rate}" if phase.learning_rate else ""
            parts.append(f"{phase.name} {length} ({steps}{rate})")
        return (
            f"plan: {' -> '.join(parts)}; at most {_epochs(self.planned_epochs([0]))} in all"
        )

    def summary(self, starts: Sequence[int], epoch: int) -> list[dict]:
        """``[{"name", "start_epoch", "epochs"}]`` of the phases begun, the last one up to
        ``epoch``."""
        ends = [*starts[1:], epoch]
        return [
            {"name": self.phases[index].name, "start_epoch": start, "epochs": end - start}
            for index, (start, end) in enumerate(zip(starts, ends))
        ]


def _epochs(count: int) -> str:
    return f"{count} epoch" if count == 1 else f"{count} epochs"
