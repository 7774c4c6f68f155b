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


HLO_WITH_A_SHARED_CONSTANT = """HloModule step
%fused_add (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %c = s32[] constant(0), metadata={op_name="jit(step)/jit(_threefry_fold_in)/step_key"}
  ROOT %add = f32[4]{0} add(%p, %p), metadata={op_name="jit(step)/add"}
}
%fused_bits (q: u32[4]) -> u32[4] {
  %q = u32[4]{0} parameter(0)
  ROOT %x = u32[4]{0} xor(%q, %q), metadata={op_name="jit(step)/threefry2x32/xor"}
}
ENTRY %main (params.1: f32[4], bits: u32[4]) -> f32[4] {
  %params.1 = f32[4]{0} parameter(0)
  %bits = u32[4]{0} parameter(1)
  %add_fusion = f32[4]{0} fusion(%params.1), kind=kLoop, calls=%fused_add
  %xor_fusion = u32[4]{0} fusion(%bits), kind=kLoop, calls=%fused_bits
  ROOT %out = f32[4]{0} add(%add_fusion, %add_fusion)
}
"""


def test_a_constant_that_xla_shares_with_random_bits_does_not_make_an_op_random_bits():
    labels = parse_hlo(HLO_WITH_A_SHARED_CONSTANT)
    assert labels["add_fusion"][0] == "elementwise"
    assert labels["xor_fusion"][0] == "random bits"
