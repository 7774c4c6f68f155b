import math

import pytest
from flax import nnx

from sparsejax.methods.greg.accounting import greg_count, greg_pruned_count
from sparsejax.models.base import Layer
from sparsejax.structure.traced_model import build_zoo_model


def abstract_model(name):
    return nnx.eval_shape(lambda: build_zoo_model(name, rngs=nnx.Rngs(params=0)))


def test_counts_match_a_hand_count_with_groups_and_a_flattened_input():
    layers = (
        Layer("conv", (3, 3, 2, 8), out_positions=25, groups=2),
        Layer("depthwise", (3, 3, 1, 8), out_positions=9, groups=8),
        Layer("fc", (8 * 9, 10)),
    )
    dense = greg_count(layers, count_adds=False)
    assert dense.weights == 3 * 3 * 2 * 8 + 3 * 3 * 8 + 72 * 10
    # The reference divides a grouped convolution's FLOPs by the groups once more.
    assert dense.flops == 144 * 25 / 2 + 72 * 9 / 8 + 720
    assert greg_count(layers).flops == 2 * dense.flops
    kept = greg_count(layers, {"fc": 4}, {"fc": 5 * 9})
    assert kept.weights == 144 + 72 + 5 * 9 * 4


def test_pruned_count_never_empties_a_layer():
    assert greg_pruned_count(0.75, 16) == 12
    assert greg_pruned_count(0.32, 64) == math.ceil(20.48) == 21
    assert greg_pruned_count(0.99, 4) == 3
    assert greg_pruned_count(0.0, 4) == 0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        greg_pruned_count(1.0, 4)


def test_a_width_beyond_the_layer_is_refused():
    layers = abstract_model("resnet20").layers
    with pytest.raises(ValueError, match="cannot keep"):
        greg_count(layers, {"fc": 11})
