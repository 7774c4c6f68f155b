import jax.numpy as jnp
import numpy as np

from sparsejax.train.checkpoint import BEST_METRIC, Checkpointer


def kept_steps(checkpointer):
    return sorted(checkpointer.all_steps())


def test_keeps_the_newest_and_the_best(tmp_path):
    checkpointer = Checkpointer(tmp_path, max_to_keep=1)
    state = {"w": jnp.zeros(3)}
    for step, error in zip([1, 2, 3, 4], [5.0, 1.0, 3.0, 4.0]):
        checkpointer.save(step, {"w": state["w"] + step}, {"epoch": step}, {BEST_METRIC: error})
    assert kept_steps(checkpointer) == [2, 4]
    restored, progress = checkpointer.restore(state)
    np.testing.assert_array_equal(restored["w"], np.full(3, 4.0))
    assert progress == {"epoch": 4}
    checkpointer.close()


def test_a_checkpoint_without_metrics_counts_as_newest_only(tmp_path):
    checkpointer = Checkpointer(tmp_path, max_to_keep=1)
    checkpointer.save(1, {"w": jnp.ones(2)}, {"epoch": 1}, {BEST_METRIC: 2.0})
    checkpointer.save(5, {"w": jnp.ones(2)}, {"epoch": 1})
    checkpointer.save(7, {"w": jnp.ones(2)}, {"epoch": 1})
    assert kept_steps(checkpointer) == [1, 7]
    checkpointer.close()


def test_saving_a_step_again_replaces_it(tmp_path):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(3, {"w": jnp.zeros(2)}, {"epoch": 0})
    checkpointer.save(3, {"w": jnp.ones(2)}, {"epoch": 1}, {BEST_METRIC: 1.0})
    restored, progress = checkpointer.restore({"w": jnp.zeros(2)})
    np.testing.assert_array_equal(restored["w"], np.ones(2))
    assert progress == {"epoch": 1}
    checkpointer.close()


def test_no_checkpoint_restores_nothing(tmp_path):
    assert Checkpointer(tmp_path).restore({"w": jnp.zeros(1)}) is None
