"""Greedy generation from a (gated or slim) byte-level LM."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.models.lm import DecoderLM, generate
from sparsejax.slim.traced import slim_traced_model
from sparsejax.structure.traced_model import TracedModel, gate_zoo_network
from tests.gated import scale_gates

PROMPT = b"def f(x):"


def small_lm() -> DecoderLM:
    return DecoderLM(rngs=nnx.Rngs(4), dim=16, depth=2, heads=4, kv_heads=2, head_dim=4,
                     ffn_hidden=24, input_shape=(16,))


def gated_lm() -> TracedModel:
    """The small LM gated from its trace by its own placements, with scale gates."""
    return gate_zoo_network(small_lm(), "lm_tiny", rngs=nnx.Rngs(5), gate_factory=scale_gates)


def greedy_reference(model, prompt: bytes, steps: int, window: int) -> bytes:
    """Each byte the argmax of the model's last-position logits on the unpadded prefix (one
    compiled call per prefix length; run op by op, the first lengths took 17 s)."""
    logits = nnx.jit(lambda model, prefix: model(prefix))
    tokens = list(prompt)
    for _ in range(steps):
        prefix = jnp.asarray([tokens[-window:]], jnp.int32)
        tokens.append(int(np.argmax(np.asarray(logits(model, prefix))[0, -1])))
    return bytes(tokens[len(prompt):])


@pytest.mark.parametrize("window", [16, 12])
def test_each_byte_is_the_argmax_given_its_prefix(window):
    model = small_lm()
    steps = 10  # 19 bytes in all: longer than either window, so the window slides
    out = generate(model, PROMPT, steps, window=window)
    assert len(out) == steps
    assert out == greedy_reference(model, PROMPT, steps, window)
    assert generate(model, PROMPT, steps, window=window) == out


def test_a_slim_network_generates_what_its_gated_model_does():
    model = gated_lm()
    rng = np.random.default_rng(0)
    for gate in model.gates.values():
        values = rng.uniform(0.5, 1.5, gate.shape) * (rng.random(gate.shape) >= 0.3)
        values.flat[0] = 1.0
        gate.value[...] = jnp.asarray(values, jnp.float32)
    slim = slim_traced_model(model, np.asarray([list(PROMPT) + [0] * 7], np.int32))
    assert slim.report.params_after < slim.report.params_before
    assert generate(slim, PROMPT, 8) == generate(model, PROMPT, 8)
    assert generate(model, PROMPT, 8) != generate(model.net, PROMPT, 8)  # the gates act


def test_generate_refuses_an_empty_prompt():
    with pytest.raises(ValueError, match="prompt"):
        generate(small_lm(), b"", 3)
