"""Models as users write them, none of which the package was built around: ``sparsify`` finds
the groups a reader of the model would name, every third gate closed slims to the gated model's
outputs, and the slim report's params are the slim arrays' kernels and biases.

Each model names the gated groups it should get (their sizes, in the order their producers run)
and, where a group stays whole, why: a reduction over its units (GroupNorm, LayerNorm) or an
op without a rule (``cumsum``). An LSTM also trains through the engine (``--model``) and slims
from its run."""

import dataclasses
import functools
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.slim.__main__ import main as slim_main
from sparsejax.structure.sparsify import sparsify
from sparsejax.train import train_and_evaluate

IMAGES = (28, 28, 1)


def conv(features_in, features_out, *, rngs, size=3, **options):
    return nnx.Conv(features_in, features_out, (size,) * 2, padding="SAME", rngs=rngs, **options)


def pooled(h):
    return h.mean(axis=(1, 2))


class SqueezeExcite(nnx.Module):
    """A convolution rescaled per channel by a two-layer gate of its own pooled output
    (Hu et al. 2018)."""

    def __init__(self, rngs):
        self.c1, self.c2 = conv(1, 16, rngs=rngs), conv(16, 8, rngs=rngs)
        self.squeeze, self.excite = nnx.Linear(16, 4, rngs=rngs), nnx.Linear(4, 16, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.c1(x))
        scale = nnx.sigmoid(self.excite(nnx.relu(self.squeeze(pooled(h)))))
        return self.head(pooled(nnx.relu(self.c2(h * scale[:, None, None, :]))))


class GroupNormCNN(nnx.Module):
    def __init__(self, rngs):
        self.c1, self.c2 = conv(1, 16, rngs=rngs), conv(16, 8, rngs=rngs)
        self.norm = nnx.GroupNorm(16, num_groups=4, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(pooled(nnx.relu(self.c2(nnx.relu(self.norm(self.c1(x)))))))


class ConvNeXtBlock(nnx.Module):
    """A patchify stem, then depthwise 7x7, LayerNorm, an inverted MLP and a layer scale added
    to the stream (Liu et al. 2022)."""

    def __init__(self, rngs):
        self.stem = conv(1, 16, rngs=rngs, size=4, strides=4)
        self.dw = conv(16, 16, rngs=rngs, size=7, feature_group_count=16)
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.up, self.down = nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 16, rngs=rngs)
        self.layer_scale = nnx.Param(jnp.full((16,), 0.5))
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        h = self.stem(x)
        branch = self.down(nnx.gelu(self.up(self.norm(self.dw(h)))))
        return self.head(pooled(h + self.layer_scale[...] * branch))


class UNet(nnx.Module):
    """Down by a strided convolution, up by resizing, the skip concatenated."""

    method = "nearest"

    def __init__(self, rngs):
        self.c1, self.down = conv(1, 8, rngs=rngs), conv(8, 16, rngs=rngs, strides=2)
        self.mid, self.c3 = conv(16, 16, rngs=rngs), conv(24, 8, rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        a = nnx.relu(self.c1(x))
        b = nnx.relu(self.mid(nnx.relu(self.down(a))))
        up = jax.image.resize(b, (*a.shape[:3], b.shape[3]), self.method)
        return self.head(pooled(nnx.relu(self.c3(jnp.concatenate([a, up], axis=-1)))))


class BilinearUNet(UNet):
    method = "bilinear"


class ChannelShuffle(nnx.Module):
    """ShuffleNet v2's unit: split the channels, convolve one half, concatenate, shuffle
    (Ma et al. 2018)."""

    def __init__(self, rngs):
        self.c1, self.branch = conv(1, 16, rngs=rngs), conv(8, 8, rngs=rngs)
        self.c2, self.head = conv(16, 8, rngs=rngs), nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        kept, convolved = jnp.split(nnx.relu(self.c1(x)), 2, axis=-1)
        h = jnp.concatenate([kept, nnx.relu(self.branch(convolved))], axis=-1)
        n, height, width, channels = h.shape
        h = h.reshape(n, height, width, 2, channels // 2).swapaxes(3, 4).reshape(h.shape)
        return self.head(pooled(nnx.relu(self.c2(h))))


class TransposedConv(nnx.Module):
    def __init__(self, rngs):
        self.c1 = conv(1, 16, rngs=rngs, strides=2)
        self.up = nnx.ConvTranspose(16, 8, (3, 3), strides=(2, 2), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(pooled(nnx.relu(self.up(nnx.relu(self.c1(x))))))


class DilatedPooled(nnx.Module):
    """A dilated convolution, SiLU and average pooling; hard swish and max pooling; a flatten
    into the head."""

    def __init__(self, rngs):
        self.c1 = conv(1, 16, rngs=rngs, kernel_dilation=2)
        self.c2 = conv(16, 16, rngs=rngs)
        self.head = nnx.Linear(16 * 7 * 7, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.avg_pool(nnx.silu(self.c1(x)), (2, 2), (2, 2))
        h = nnx.max_pool(jax.nn.hard_swish(self.c2(h)), (2, 2), (2, 2))
        return self.head(h.reshape(h.shape[0], -1))


class GatedLinearUnit(nnx.Module):
    """One projection split in two halves, one gating the other (Dauphin et al. 2017)."""

    def __init__(self, rngs):
        self.project, self.head = nnx.Linear(784, 64, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        values, gates = jnp.split(self.project(x.reshape(x.shape[0], -1)), 2, axis=-1)
        return self.head(values * nnx.sigmoid(gates))


class StridedSlices(nnx.Module):
    """Downsampling by strided slicing and padding."""

    def __init__(self, rngs):
        self.c1, self.c2 = conv(1, 16, rngs=rngs), conv(16, 16, rngs=rngs)
        self.head = nnx.Linear(16 * 8 * 8, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.c1(x))[:, ::2, ::2]
        h = jnp.pad(nnx.relu(self.c2(h)), ((0, 0), (1, 1), (1, 1), (0, 0)))[:, ::2, ::2]
        return self.head(h.reshape(h.shape[0], -1))


class NormDropoutMLP(nnx.Module):
    """BatchNorm, leaky ReLU and clipping, a global max, ELU and dropout."""

    def __init__(self, rngs):
        self.c1, self.norm = conv(1, 16, rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
        self.fc, self.head = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)
        self.dropout = nnx.Dropout(0.1, rngs=rngs)

    def __call__(self, x):
        h = jnp.clip(nnx.leaky_relu(self.norm(self.c1(x))), -3.0, 3.0).max(axis=(1, 2))
        return self.head(self.dropout(nnx.elu(self.fc(h))))


class ReZero(nnx.Module):
    """A residual branch scaled by one learned scalar (Bachlechner et al. 2021)."""

    def __init__(self, rngs):
        self.c1, self.c2 = conv(1, 16, rngs=rngs), conv(16, 16, rngs=rngs)
        self.alpha = nnx.Param(jnp.array(0.1))
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.c1(x))
        return self.head(pooled(h + self.alpha[...] * nnx.relu(self.c2(h))))


class MixedPrecision(nnx.Module):
    """Layers computing in bfloat16 beside a float32 head."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(1, 16, (3, 3), dtype=jnp.bfloat16, rngs=rngs)
        self.fc = nnx.Linear(16, 32, dtype=jnp.bfloat16, rngs=rngs)
        self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.fc(pooled(nnx.relu(self.c1(x)))))
        return self.head(h.astype(jnp.float32))


class SharedConv(nnx.Module):
    """One convolution applied twice in a row: its outputs are also its inputs."""

    def __init__(self, rngs):
        self.c1, self.c2 = conv(1, 16, rngs=rngs), conv(16, 16, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        h = nnx.relu(self.c1(x))
        return self.head(pooled(nnx.relu(self.c2(nnx.relu(self.c2(h))))))


class MBConv(nnx.Module):
    """MobileNetV3's block: expand, depthwise, squeeze-excite with a hard sigmoid, project,
    added to the stream (Howard et al. 2019)."""

    def __init__(self, rngs):
        self.stem, self.expand = conv(1, 8, rngs=rngs), conv(8, 32, rngs=rngs, size=1)
        self.dw = conv(32, 32, rngs=rngs, feature_group_count=32)
        self.squeeze, self.excite = conv(32, 8, rngs=rngs, size=1), conv(8, 32, rngs=rngs, size=1)
        self.project, self.head = conv(32, 8, rngs=rngs, size=1), nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu6(self.stem(x))
        e = jax.nn.hard_swish(self.dw(jax.nn.hard_swish(self.expand(h))))
        squeezed = nnx.relu(self.squeeze(e.mean(axis=(1, 2), keepdims=True)))
        return self.head(pooled(h + self.project(e * jax.nn.hard_sigmoid(self.excite(squeezed)))))


class Conv1D(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 16, (5,), rngs=rngs)
        self.c2 = nnx.Conv(16, 16, (3,), strides=2, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.c2(nnx.relu(self.c1(x)))).mean(axis=1))


class Conv3D(nnx.Module):
    def __init__(self, rngs):
        self.c1, self.head = nnx.Conv(1, 8, (3, 3, 3), rngs=rngs), nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.c1(x)).mean(axis=(1, 2, 3)))


class SequentialNet(nnx.Module):
    def __init__(self, rngs):
        self.net = nnx.Sequential(
            nnx.Conv(1, 8, (3, 3), rngs=rngs), nnx.relu, pooled, nnx.Linear(8, 16, rngs=rngs),
            nnx.gelu, nnx.Linear(16, 10, rngs=rngs),
        )

    def __call__(self, x):
        return self.net(x)


class Rematerialised(nnx.Module):
    """A layer recomputed in the backward pass (``nnx.remat``)."""

    def __init__(self, rngs):
        self.c1, self.fc = nnx.Conv(1, 8, (3, 3), rngs=rngs), nnx.Linear(8, 16, rngs=rngs)
        self.head = nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        recomputed = nnx.remat(lambda layer, h: nnx.relu(layer(h)))
        return self.head(recomputed(self.fc, pooled(nnx.relu(self.c1(x)))))


class RecurrentClassifier(nnx.Module):
    """A recurrent layer over the image's rows (``nnx.RNN`` of an LSTM cell, or of a GRU cell
    with its three gates' kernels fused), its last state into the head."""

    def __init__(self, rngs, cell=nnx.LSTMCell, hidden=32):
        self.rnn = nnx.RNN(cell(28, hidden, rngs=rngs))
        self.head = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(self.rnn(x[..., 0])[:, -1])


class CumulativeSum(nnx.Module):
    def __init__(self, rngs):
        self.fc, self.head = nnx.Linear(784, 32, rngs=rngs), nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.cumsum(nnx.relu(self.fc(x.reshape(x.shape[0], -1))), axis=-1))


class ScannedStandardised(nnx.Module):
    """A stem, three residual blocks whose stacked 32 x 32 kernels are standardised over their
    rows inside the scan that applies them, a hidden layer and a head."""

    def __init__(self, rngs):
        self.stem = nnx.Linear(784, 32, rngs=rngs)
        self.stack = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (3, 32, 32)))
        self.hidden, self.head = nnx.Linear(32, 16, rngs=rngs), nnx.Linear(16, 10, rngs=rngs)

    def __call__(self, x):
        def block(h, v):
            return h + nnx.relu(h @ ((v - v.mean(axis=0)) / (v.std(axis=0) + 1e-5))) / 8, None

        h, _ = jax.lax.scan(block, nnx.relu(self.stem(x.reshape(x.shape[0], -1))),
                            self.stack[...])
        return self.head(nnx.relu(self.hidden(h)))


@dataclasses.dataclass(frozen=True)
class UserModel:
    """A model, its input shape, the sizes of the groups it should gate and the reasons the
    groups it keeps whole (but its logits) should give."""

    build: Callable[[nnx.Rngs], nnx.Module]
    gated: tuple[int, ...]
    kept: tuple[str, ...] = ()
    input_shape: tuple[int, ...] = IMAGES


MODELS = {
    "squeeze_excite": UserModel(SqueezeExcite, (16, 4, 8)),
    "group_norm": UserModel(GroupNormCNN, (8,), ("reduction over units",)),
    "convnext_block": UserModel(ConvNeXtBlock, (64,), ("reduction over units",)),
    "unet": UserModel(UNet, (8, 16, 16, 8)),
    "bilinear_unet": UserModel(BilinearUNet, (8, 16, 16, 8)),
    "channel_shuffle": UserModel(ChannelShuffle, (16, 8, 8)),
    "transposed_conv": UserModel(TransposedConv, (16, 8)),
    "dilated_pooled": UserModel(DilatedPooled, (16, 16)),
    "gated_linear_unit": UserModel(GatedLinearUnit, (32,)),
    "strided_slices": UserModel(StridedSlices, (16, 16)),
    "norm_dropout_mlp": UserModel(NormDropoutMLP, (16, 32)),
    "rezero": UserModel(ReZero, (16,)),
    "mixed_precision": UserModel(MixedPrecision, (16, 32)),
    "shared_conv": UserModel(SharedConv, (16,)),
    "mbconv": UserModel(MBConv, (8, 32, 8)),
    "conv1d": UserModel(Conv1D, (16, 16), input_shape=(32, 3)),
    "conv3d": UserModel(Conv3D, (8,), input_shape=(8, 8, 8, 1)),
    "sequential": UserModel(SequentialNet, (8, 16)),
    "remat": UserModel(Rematerialised, (8, 16)),
    "lstm": UserModel(RecurrentClassifier, (32,)),
    "gru": UserModel(functools.partial(RecurrentClassifier, cell=nnx.GRUCell, hidden=24), (24,)),
    "cumsum": UserModel(CumulativeSum, (), ("no rule for this primitive",)),
    "scanned_standardised": UserModel(
        ScannedStandardised, (16,), ("kernel computed from its parameter",)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_user_model_gates_what_it_should_and_slims_to_its_outputs(name):
    case = MODELS[name]
    x = jax.random.uniform(jax.random.key(0), (6, *case.input_shape))
    gated = sparsify(case.build(nnx.Rngs(0)), x[:1])
    assert tuple(gate.log_alpha.shape[0] for gate in gated.gates) == case.gated
    reasons = [u.reason for u in gated.report().ungated if "model's output" not in u.reason]
    assert [r.split(" (")[0] for r in reasons] == list(case.kept)
    for i, gate in enumerate(gated.gates):
        gate.log_alpha[...] = gate.log_alpha[...].at[i % 3::3].set(-10.0)
    slim = gated.slim(x[:1], check=x)
    assert slim.report.max_logit_difference < 1e-5
    layer_arrays = {path for layer in gated.structure.layers for path in (layer.kernel, layer.bias)}
    stored = sum(np.size(v) for k, v in slim.params.items() if k in layer_arrays)
    assert slim.report.params_after == stored
    if case.gated:
        assert slim.report.params_after < slim.report.params_before


class EngineLSTM(nnx.Module):
    """An LSTM as the engine takes it: ``nnx.RNN`` without a random stream of its own (the
    engine keeps none), started from a zero state."""

    def __init__(self, *, rngs, num_classes, hidden=16):
        self.hidden = hidden
        self.rnn = nnx.RNN(nnx.LSTMCell(28, hidden, rngs=rngs), rngs=False)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        zeros = jnp.zeros((x.shape[0], self.hidden), x.dtype)
        return self.head(self.rnn(x[..., 0], initial_carry=(zeros, zeros))[:, -1])


def engine_lstm(*, rngs, num_classes):
    return EngineLSTM(rngs=rngs, num_classes=num_classes)


def test_an_lstm_trains_under_the_engine_and_slims_from_its_run(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = get_config("l0_hc")
    config.update({
        "model": f"{Path(__file__).stem}:engine_lstm", "dataset": "synthetic",
        "num_train": 128, "num_test": 64, "batch_size": 32, "eval_batch_size": 64, "epochs": 1,
        "steps_per_epoch": 3, "log_every": 3,
    })
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["dense_units"] == [16] and np.isfinite(summary["test_error"])
    assert slim_main([str(tmp_path / "run")]) == 0
    report = json.loads((tmp_path / "run" / "slim" / "slim_report.json").read_text())
    assert report["max_logit_difference"] < 1e-5
