import math

from flax import nnx

from benchmarks.trace_time import input_shape, trace_once
from sparsejax.models import build_model


def layer_params(name: str, shape: tuple[int, ...], classes: int) -> float:
    """The kernel and bias entries of a plain network's convolutions and dense layers."""
    model = nnx.eval_shape(lambda: build_model(name, rngs=nnx.Rngs(0), num_classes=classes,
                                               input_shape=shape))
    return float(sum(
        math.prod(node.kernel.shape)
        + (0 if node.bias is None else math.prod(node.bias.shape))
        for _, node in nnx.iter_graph(model) if hasattr(node, "kernel")
    ))


def test_each_zoo_model_is_traced_on_its_datasets_example():
    assert input_shape("resnet50", 64) == (64, 64, 3)
    assert input_shape("resnet20", 64) == (32, 32, 3)
    assert input_shape("lenet5", 64) == (28, 28, 1)
    seconds, structure = trace_once("resnet20", (32, 32, 3))
    assert seconds > 0
    # 9 block outputs and the 3 option-A padded streams (fixed) and the logits (blocked)
    assert (len(structure.groups), sum(g.prunable for g in structure.groups)) == (13, 9)
    assert structure.count().params == layer_params("resnet20", (32, 32, 3), 10) == 269_722 - (
        2 * 16 * 7 + 2 * 32 * 6 + 2 * 64 * 6)  # all but the 19 BatchNorms' scales and biases
    shape = input_shape("lm_tiny", 64)
    _, text = trace_once("lm_tiny", shape)
    assert text.count().params == layer_params("lm_tiny", shape, 256)  # 256 byte ids
