from benchmarks.trace_time import input_shape, trace_once


def test_each_zoo_model_is_traced_on_its_datasets_example():
    assert input_shape("resnet50", 64) == (64, 64, 3)
    assert input_shape("resnet20", 64) == (32, 32, 3)
    assert input_shape("lenet5", 64) == (28, 28, 1)
    seconds, structure = trace_once("resnet20", (32, 32, 3))
    assert seconds > 0
    # 9 block outputs and the 3 option-A padded streams (fixed) and the logits (blocked)
    assert (len(structure.groups), sum(g.prunable for g in structure.groups)) == (13, 9)
    assert structure.count().params == 268_346
    _, text = trace_once("lm_tiny", input_shape("lm_tiny", 64))
    assert text.count().params == 819_200  # the declared layers of lm_tiny, 256 byte ids
