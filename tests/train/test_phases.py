"""The epoch arithmetic of a run's phases."""

import optax
import pytest

from sparsejax.errors import ConfigError
from sparsejax.methods.base import Phase
from sparsejax.train.phases import PhasePlan

FIRST, LAST = optax.sgd(0.1), optax.adam(1e-3)


def plan():
    return PhasePlan(
        (
            Phase("warm-up", None, 2, FIRST, learning_rate="sgd 0.1"),
            Phase("search", None, 5, None, until=lambda state: state["done"]),
            Phase("tune", None, 3, LAST),
        ),
        steps_per_epoch=10,
    )


def test_a_phase_without_an_optimizer_continues_the_previous_one():
    phases = plan()
    assert [phases.optimizer(i) for i in range(3)] == [FIRST, FIRST, LAST]
    assert [phases.starts_optimizer(i) for i in range(3)] == [True, False, True]


def test_a_phase_ends_after_its_epochs_or_at_the_first_epoch_end_its_test_holds():
    phases = plan()
    assert not phases.ended(0, 0, 1, lambda: pytest.fail("no test to fetch the state for"))
    assert phases.ended(0, 0, 2, lambda: {"done": False})
    assert not phases.ended(1, 2, 2, lambda: {"done": True})  # not before one epoch
    assert not phases.ended(1, 2, 3, lambda: {"done": False})
    assert phases.ended(1, 2, 3, lambda: {"done": True})
    assert phases.ended(1, 2, 7, lambda: {"done": False})  # its longest length


def test_the_planned_length_shrinks_when_a_phase_ends_early():
    phases = plan()
    assert phases.planned_epochs([0]) == 10
    assert phases.planned_epochs([0, 2]) == 10
    assert phases.planned_epochs([0, 2, 4]) == 7
    assert phases.summary([0, 2, 4], 6) == [
        {"name": "warm-up", "start_epoch": 0, "epochs": 2},
        {"name": "search", "start_epoch": 2, "epochs": 2},
        {"name": "tune", "start_epoch": 4, "epochs": 2},
    ]
    described = phases.describe()
    assert "warm-up 2 epochs (20 steps; sgd 0.1)" in described
    assert "search at most 5 epochs, ending when the method says so (50 steps)" in described
    assert described.endswith("at most 10 epochs in all")


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match="first phase"):
        PhasePlan((Phase("a", None, 1),), steps_per_epoch=1)
    with pytest.raises(ConfigError, match="-1 epochs"):
        PhasePlan((Phase("a", None, -1, FIRST),), steps_per_epoch=1)
