import jax
import jax.numpy as jnp

from benchmarks.step_breakdown import parse_hlo, trace_ops


def _conv(x, kernel):
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _loss(params, x):
    return jnp.sum(jnp.tanh(_conv(x, params["kernel"])).reshape(4, -1) @ params["w"])


def test_labels_the_forward_convolution_and_the_gradients_of_a_step():
    params = {"kernel": jnp.ones((3, 3, 2, 5)), "w": jnp.ones((6 * 6 * 5, 7))}
    x = jnp.ones((4, 8, 8, 2))
    step = jax.jit(jax.grad(_loss))
    labels = parse_hlo(step.lower(params, x).compile().as_text()).values()
    assert ("convolution", "forward", "f32[4,6,6,5]") in labels
    kernel_grads = [shape for label, kind, shape in labels
                    if label == "convolution" and kind == "weight grad"]
    dot_grads = [shape for label, kind, shape in labels if label == "dot" and kind == "weight grad"]
    assert kernel_grads and all(sorted(s[4:-1].split(",")) == ["2", "3", "3", "5"]
                                for s in kernel_grads)
    assert dot_grads and all(sorted(s[4:-1].split(",")) == ["180", "7"] for s in dot_grads)


def test_trace_sums_the_ops_of_a_jitted_call(tmp_path):
    a = jnp.ones((256, 256))
    dot = jax.jit(lambda a: jnp.tanh(a @ a))
    dot(a).block_until_ready()
    totals, idle = trace_ops(lambda: dot(a).block_until_ready(), str(tmp_path))
    assert totals and all(seconds > 0 for seconds in totals.values())
    assert idle >= 0
