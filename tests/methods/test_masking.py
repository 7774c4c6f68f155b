"""Methods that prune units refuse a model gated at weight granularity, before any training."""

import pytest
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.methods import RunInfo, create_method
from sparsejax.structure.traced_model import build_zoo_model
from tests.methods.test_methods import method_config


@pytest.mark.parametrize("method_name, overrides, setting", [
    ("gmp", {"gmp_structure": "unit"}, "gmp_structure=unit"),
    ("greg1", {"greg_granularity": "filter", "pretrain_epochs": 0}, "greg_granularity=filter"),
])
def test_pruning_units_without_unit_gate_slots_is_refused_at_init(method_name, overrides, setting):
    """A unit goes with every slice the trace ties to it, through its unit gate slot; a model
    gated by weights has none, and zeroing its kernel columns would not remove the unit."""
    config = method_config(method_name, "lenet5", granularity="weight", **overrides)
    method = create_method(method_name, config, RunInfo(num_train=1000, steps_per_epoch=10,
                                                        epochs=3))
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), gate_factory=method.make_gates,
                            granularity="weight")
    with pytest.raises(ConfigError, match=f"{setting} prunes units through the model's unit "
                       "gate slots.*leave granularity at unit, or prune single weights"):
        method.init(model)


@pytest.mark.parametrize("method_name, overrides", [
    ("gmp", {"gmp_structure": "weight"}),
    ("greg1", {"greg_granularity": "weight", "pretrain_epochs": 0}),
])
def test_pruning_weights_of_a_model_gated_by_weights_masks_whole_kernels(method_name, overrides):
    config = method_config(method_name, "lenet5", granularity="weight", **overrides)
    method = create_method(method_name, config, RunInfo(num_train=1000, steps_per_epoch=10,
                                                        epochs=3))
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), gate_factory=method.make_gates,
                            granularity="weight")
    state = method.init(model)
    masks = (
        state["masks"] if method_name == "gmp"
        else {layer.name: layer_state["mask"]
              for layer, layer_state in zip(method.pruned_layers(model), state["layers"])}
    )
    assert masks
    for name, mask in masks.items():
        assert mask.shape == model.layer_module(name).kernel.shape, name
