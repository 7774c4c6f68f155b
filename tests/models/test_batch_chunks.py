import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.models.batch_chunks import (
    CHUNK_EXAMPLES,
    CHUNKS_VARIABLE,
    MAX_CHUNKS,
    batch_chunks,
    convolve,
    whole_batch,
)
from sparsejax.structure.trace.analyze import trace_structure
from sparsejax.structure.traced_model import build_zoo_model


@pytest.mark.parametrize(
    ("batch", "backend", "devices", "want"),
    [
        (100, "cpu", 1, 100 // CHUNK_EXAMPLES),
        (CHUNK_EXAMPLES * MAX_CHUNKS * 4, "cpu", 1, MAX_CHUNKS),
        (CHUNK_EXAMPLES - 1, "cpu", 1, 1),
        (100, "gpu", 1, 1),
        (100, "tpu", 1, 1),
        (100, "cpu", 8, 1),
    ],
)
def test_the_automatic_policy_splits_only_a_single_cpu_device_batch(batch, backend, devices, want):
    assert batch_chunks(batch, environ={}, backend=backend, device_count=devices) == want


def test_the_environment_sets_the_slices_and_whole_batch_turns_them_off():
    assert batch_chunks(100, environ={CHUNKS_VARIABLE: "3"}, backend="gpu", device_count=1) == 3
    assert batch_chunks(2, environ={CHUNKS_VARIABLE: "5"}, backend="cpu", device_count=1) == 2
    assert batch_chunks(100, environ={CHUNKS_VARIABLE: "1"}, backend="cpu", device_count=1) == 1
    with whole_batch():
        assert batch_chunks(100, environ={CHUNKS_VARIABLE: "3"}) == 1
    assert batch_chunks(100, environ={CHUNKS_VARIABLE: "3"}) == 3


@pytest.mark.parametrize("setting", ["0", "-2", "four", "1.5"])
def test_a_bad_setting_is_one_config_error(setting):
    with pytest.raises(ConfigError, match=CHUNKS_VARIABLE):
        batch_chunks(100, environ={CHUNKS_VARIABLE: setting})


@pytest.mark.parametrize(
    ("options", "in_channels", "kernel_in"),
    [
        (dict(window_strides=(1, 1), padding="VALID"), 3, 3),
        (dict(window_strides=(2, 2), padding="SAME"), 3, 3),
        (dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), feature_group_count=4), 4, 1),
    ],
)
def test_a_split_convolution_and_its_gradients_equal_the_whole_batch_ones(
    monkeypatch, options, in_channels, kernel_in
):
    monkeypatch.setenv(CHUNKS_VARIABLE, "4")
    options = dict(options, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.random.normal(jax.random.key(0), (11, 7, 7, in_channels))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, kernel_in, 4))

    def loss(convolution, x, kernel):
        return jnp.sum(jnp.sin(convolution(x, kernel, **options)))

    split_program = jax.make_jaxpr(lambda x, k: convolve(x, k, **options))(x, kernel)
    assert _convolution_batches(split_program.jaxpr) == [3, 3, 3, 2]
    np.testing.assert_allclose(
        convolve(x, kernel, **options),
        jax.lax.conv_general_dilated(x, kernel, **options),
        rtol=1e-6,
        atol=1e-6,
    )
    got = jax.grad(loss, argnums=(1, 2))(convolve, x, kernel)
    want = jax.grad(loss, argnums=(1, 2))(jax.lax.conv_general_dilated, x, kernel)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _lenet5_loss_and_grads(x, labels):
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), num_classes=10)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(x, train=False)
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    return jax.jit(jax.value_and_grad(loss))(params)


def _convolution_batches(jaxpr) -> list[int]:
    """The batch size of every convolution in ``jaxpr``, those inside calls included (a sliced
    stride-1 convolution is a ``custom_vjp_call``)."""
    batches = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            batches.append(eqn.invars[0].aval.shape[0])
        for inner in jax.extend.core.jaxprs_in_params(eqn.params):
            batches.extend(_convolution_batches(inner))
    return batches


def _convolutions_per_layer(model, x) -> int:
    program = jax.make_jaxpr(lambda x: model(x, train=False))(x)
    return len(_convolution_batches(program.jaxpr)) // 2  # LeNet-5 has two convolution layers


def test_a_zoo_model_trains_the_same_on_slices(monkeypatch):
    x = jax.random.normal(jax.random.key(0), (40, 28, 28, 1))
    labels = jax.random.randint(jax.random.key(1), (40,), 0, 10)
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), num_classes=10)
    monkeypatch.delenv(CHUNKS_VARIABLE, raising=False)
    assert _convolutions_per_layer(model, x) == 40 // CHUNK_EXAMPLES  # one CPU device here
    monkeypatch.setenv(CHUNKS_VARIABLE, "3")
    assert _convolutions_per_layer(model, x) == 3
    monkeypatch.setenv(CHUNKS_VARIABLE, "1")
    want_loss, want_grads = _lenet5_loss_and_grads(x, labels)
    monkeypatch.setenv(CHUNKS_VARIABLE, "4")
    got_loss, got_grads = _lenet5_loss_and_grads(x, labels)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_tracer_sees_one_convolution_per_layer(monkeypatch):
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), num_classes=10)
    x = jnp.zeros((40, 28, 28, 1))

    def trace():
        return trace_structure(model, x, apply=lambda m, x: m(x, train=False))

    monkeypatch.setenv(CHUNKS_VARIABLE, "1")
    whole = trace()
    monkeypatch.setenv(CHUNKS_VARIABLE, "4")
    split = trace()
    assert [layer.kernel for layer in split.layers] == [layer.kernel for layer in whole.layers]
    assert len(split.layers) == 4
    assert split.count() == whole.count()
    assert [g.size for g in split.groups] == [g.size for g in whole.groups]
