import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.models.batch_chunks import CHUNKS_VARIABLE, column_gradients, convolve
from sparsejax.models.column_gradient import (
    column_input_gradient,
    explicit_padding,
    sliced_convolution,
)
from sparsejax.models.layers import Conv
from sparsejax.structure.traced_model import build_zoo_model

DIMENSIONS = ("NHWC", "HWIO", "NHWC")
CASES = [
    # padding, input (batch, height, width, channels), kernel (kh, kw, in, out)
    ("VALID", (5, 12, 12, 3), (5, 5, 3, 4)),
    ("SAME", (4, 9, 9, 2), (3, 3, 2, 5)),
    (((1, 2), (0, 1)), (3, 7, 8, 3), (3, 2, 3, 2)),
]


def _xla(x, kernel, padding):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=DIMENSIONS)


def _operands(input_shape, kernel_shape):
    x = jax.random.normal(jax.random.key(0), input_shape)
    kernel = jax.random.normal(jax.random.key(1), kernel_shape)
    return x, kernel


@pytest.mark.parametrize(("padding", "input_shape", "kernel_shape"), CASES)
def test_the_column_input_gradient_is_xlas(padding, input_shape, kernel_shape):
    x, kernel = _operands(input_shape, kernel_shape)
    y, vjp = jax.vjp(lambda x: _xla(x, kernel, padding), x)
    dy = jax.random.normal(jax.random.key(2), y.shape)
    pads = explicit_padding(padding, input_shape[1:3], kernel_shape[:2])
    np.testing.assert_allclose(
        column_input_gradient(dy, kernel, input_shape[1:3], pads), vjp(dy)[0],
        rtol=1e-5, atol=1e-5,
    )


@pytest.mark.parametrize(("padding", "input_shape", "kernel_shape"), CASES)
def test_a_sliced_convolution_is_the_convolution_with_its_gradients(
    padding, input_shape, kernel_shape
):
    x, kernel = _operands(input_shape, kernel_shape)

    def loss(convolution, x, kernel):
        return jnp.sum(jnp.sin(convolution(x, kernel)))

    sliced = lambda x, k: sliced_convolution(x, k, padding, 2)  # noqa: E731
    whole = lambda x, k: _xla(x, k, padding)  # noqa: E731
    np.testing.assert_allclose(jax.jit(sliced)(x, kernel), whole(x, kernel), rtol=1e-6, atol=1e-5)
    got = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)(sliced, x, kernel)
    want = jax.grad(loss, argnums=(1, 2))(whole, x, kernel)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def _has_custom_vjp(options, x, kernel) -> bool:
    """Whether ``convolve`` traces to a custom-gradient call (a new function each time: traces
    are cached per function, and the settings are read while tracing)."""
    program = jax.make_jaxpr(
        lambda x, k: convolve(x, k, dimension_numbers=DIMENSIONS, **options)
    )(x, kernel)
    return any("custom_vjp" in eqn.primitive.name for eqn in program.eqns)


@pytest.mark.parametrize(
    ("options", "columns"),
    [
        (dict(window_strides=(1, 1), padding="VALID"), True),
        (dict(window_strides=(1, 1), padding=((1, 0), (1, 0))), True),
        (dict(window_strides=(1, 1), padding="SAME"), False),
        (dict(window_strides=(2, 2), padding="VALID"), False),
        (dict(window_strides=(1, 1), padding="VALID", feature_group_count=2), False),
        (dict(window_strides=(1, 1), padding="VALID", rhs_dilation=(2, 2)), False),
    ],
)
def test_only_sliced_stride_one_convolutions_that_shrink_take_column_gradients(
    monkeypatch, options, columns
):
    monkeypatch.setenv(CHUNKS_VARIABLE, "2")
    x, kernel = _operands((4, 6, 6, 2), (3, 3, 2 // options.get("feature_group_count", 1), 2))
    assert _has_custom_vjp(options, x, kernel) == columns
    with column_gradients(False):
        assert not _has_custom_vjp(options, x, kernel)
    monkeypatch.setenv(CHUNKS_VARIABLE, "1")
    assert not _has_custom_vjp(options, x, kernel)


@pytest.mark.parametrize("train", [False, True])
def test_lenet5s_first_gates_on_the_second_convolutions_rows_are_gates_on_its_outputs(train):
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), num_classes=10)
    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    z = {slot.name: jax.random.uniform(jax.random.key(i), slot.shape)
         for i, slot in enumerate(model.gate_slots)}
    z["conv1"] = z["conv1"].at[:5].set(0.0)
    per_example = dict(z, conv1=jnp.broadcast_to(z["conv1"], (4, *z["conv1"].shape)))
    np.testing.assert_allclose(
        model.forward(x, z, train=train), model.forward(x, per_example, train=train),
        rtol=1e-5, atol=1e-5,
    )


def _concatenated_shapes(fn, *args) -> list[tuple[int, ...]]:
    program = jax.make_jaxpr(fn)(*args)
    return [eqn.outvars[0].aval.shape for eqn in program.eqns
            if eqn.primitive.name == "concatenate"]


def test_a_convolutions_epilogue_runs_on_each_slice_and_is_the_same_function(monkeypatch):
    monkeypatch.setenv(CHUNKS_VARIABLE, "3")
    conv = Conv(2, 4, 3, rngs=nnx.Rngs(0))
    conv.bias[...] = jnp.arange(4.0) / 4 - 0.5
    x = jax.random.normal(jax.random.key(0), (7, 10, 10, 2))
    then = lambda y: jax.nn.relu(y)[:, ::2, ::2, :]  # noqa: E731

    graphdef, params = nnx.split(conv)

    def loss(params, epilogue):
        layer = nnx.merge(graphdef, params)
        y = layer(x, then=then) if epilogue else then(layer(x))
        return jnp.sum(jnp.sin(y))

    np.testing.assert_allclose(loss(params, True), loss(params, False), rtol=1e-6)
    got = jax.grad(loss)(params, True)
    want = jax.grad(loss)(params, False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    shapes = _concatenated_shapes(lambda x: conv(x, then=then), x)
    pooled = (7, 4, 4, 4)  # the slices' outputs pooled before they are joined
    assert shapes == [pooled]
