"""Gradual magnitude pruning (``gmp``): the cubic schedule at its pruning steps, per-layer and
global targets, persistent masks, unit pruning by L1 norm, and an engine run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.errors import ConfigError
from sparsejax.methods import RunInfo, create_method
from sparsejax.structure.traced_model import build_zoo_model
from sparsejax.train import train_and_evaluate
from sparsejax.train.metrics import read_metrics
from sparsejax.train.state import merge_model, split_model
from tests.methods.test_methods import method_config
from tests.train.test_loop import config_for


def gmp(model="lenet5", run=RunInfo(num_train=1000, steps_per_epoch=10, epochs=3), **overrides):
    """The gmp method and a freshly built ``model`` (gated as the engine gates it for gmp) and
    the method's initial state."""
    config = method_config("gmp", model, **overrides)
    method = create_method("gmp", config, run)
    cifar = model not in ("mlp", "lenet5")
    kwargs = {"num_classes": 10, "input_shape": (32, 32, 3)} if cifar else {}
    net = build_zoo_model(model, rngs=nnx.Rngs(0), gate_factory=method.make_gates,
                          use_placements=method.uses_gate_placements, **kwargs)
    return method, net, method.init(net)


class Stepper:
    """Jitted ``after_update`` over split parameters, optionally after a fake optimizer update
    that moves every parameter (pruned ones too) by ``shift``."""

    def __init__(self, method, net):
        self.graphdef, self.params, self.rest = split_model(net)

        @jax.jit
        def step(params, rest, state, step, shift):
            params = jax.tree.map(lambda p: p + shift, params)
            model = merge_model(self.graphdef, params, rest)
            state = method.after_update(model, state, step, jax.random.key(0))
            _, params, rest = split_model(model)
            return params, rest, state

        self._step = step

    def __call__(self, state, step, shift=0.0):
        self.params, self.rest, state = self._step(
            self.params, self.rest, state, jnp.int32(step), jnp.float32(shift)
        )
        return state

    @property
    def model(self):
        return merge_model(self.graphdef, self.params, self.rest)


def masks(state):
    return {name: np.asarray(mask) for name, mask in state["masks"].items()}


def test_target_follows_the_cubic_schedule_at_pruning_steps_and_is_held_between():
    method, _, _ = gmp(
        "mlp", run=RunInfo(num_train=1000, steps_per_epoch=10, epochs=6),
        initial_sparsity=0.1, final_sparsity=0.8, prune_start_epoch=1.0, prune_end_epoch=4.0,
        prune_every=7,
    )
    # t_0 = 10, t_1 = 40: steps t_0 + k dt up to t_1, and t_1 itself (dt does not divide 30).
    steps = [10, 17, 24, 31, 38, 40]
    updates = jnp.arange(61)
    assert [int(u) for u in updates if method.is_pruning_step(u)] == steps
    targets = np.asarray(method.target_sparsity(updates))

    def eq1(t):
        return 0.8 + (0.1 - 0.8) * (1 - (t - 10) / 30) ** 3

    for u in range(61):
        held = max((s for s in steps if s <= u), default=None)
        expected = 0.1 if held is None else eq1(held)
        assert targets[u] == pytest.approx(expected, abs=1e-6), u
    assert targets[40] == pytest.approx(0.8) and targets[60] == pytest.approx(0.8)


def test_the_default_ramp_ends_at_two_thirds_of_the_run_and_short_runs_reach_the_target():
    # dt = 100 (the default) exceeds the whole ramp: pruning at update 1 and at the ramp's end.
    method, _, _ = gmp("mlp", run=RunInfo(num_train=3000, steps_per_epoch=30, epochs=1), epochs=1)
    assert method.config.prune_end_epoch == pytest.approx(2 / 3)
    pruning = [u for u in range(1, 31) if method.is_pruning_step(u)]
    assert pruning == [1, 20]
    assert float(method.target_sparsity(30)) == pytest.approx(0.9)


@pytest.mark.parametrize("bad", [
    {"gmp_scope": "net"}, {"gmp_structure": "filter"}, {"final_sparsity": 1.0},
    {"initial_sparsity": 0.5, "final_sparsity": 0.4}, {"prune_every": 0},
    {"prune_start_epoch": 2.0, "prune_end_epoch": 1.0},
])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        gmp("mlp", **bad)


def test_layer_scope_meets_every_layers_target_and_masks_persist():
    method, net, state = gmp(
        "lenet5", final_sparsity=0.75, prune_end_epoch=1.0, prune_every=3
    )
    stepper = Stepper(method, net)
    previous = masks(state)
    for step in range(14):
        # Every update moves all weights, pruned ones included (as momentum or decay would).
        state = stepper(state, step, shift=1e-3)
        target = float(method.target_sparsity(step + 1))
        model = stepper.model
        for name, mask in masks(state).items():
            assert np.all(mask <= previous[name]), "a pruned weight revived"
            kernel = np.asarray(model.layer_module(name).kernel[...])
            np.testing.assert_array_equal(kernel == 0.0, ~mask)
            assert abs((~mask).sum() - target * mask.size) <= 1.0, (step, name)
        previous = masks(state)
    assert float(method.target_sparsity(14)) == pytest.approx(0.75)
    report = method.report(stepper.model, state)
    assert report["gmp/overall_sparsity"] == pytest.approx(0.75, abs=1e-5)
    assert all(s == pytest.approx(0.75, abs=1e-4) for s in report["gmp/sparsity"].values())


def test_layer_scope_prunes_the_smallest_magnitudes():
    method, net, state = gmp("mlp", final_sparsity=0.6, prune_start_epoch=0.0,
                             prune_end_epoch=0.0)
    before = {l.name: np.abs(np.asarray(net.layer_module(l.name).kernel[...])) for l in net.layers}
    stepper = Stepper(method, net)
    state = stepper(state, 0)
    for name, mask in masks(state).items():
        assert before[name][~mask].max() <= before[name][mask].min()
        assert abs((~mask).mean() - 0.6) <= 1.0 / mask.size


def test_global_scope_uses_one_threshold():
    method, net, state = gmp("lenet5", gmp_scope="global", final_sparsity=0.9,
                             prune_start_epoch=0.0, prune_end_epoch=0.0)
    before = {l.name: np.abs(np.asarray(net.layer_module(l.name).kernel[...])) for l in net.layers}
    stepper = Stepper(method, net)
    state = stepper(state, 0)
    got = masks(state)
    pruned = np.concatenate([before[n][~m] for n, m in got.items()])
    kept = np.concatenate([before[n][m] for n, m in got.items()])
    assert pruned.max() <= kept.min()
    total = sum(m.size for m in got.values())
    assert abs(sum((~m).sum() for m in got.values()) - 0.9 * total) <= 1.0
    per_layer = {n: float((~m).mean()) for n, m in got.items()}
    assert max(per_layer.values()) - min(per_layer.values()) > 0.1, per_layer
    report = method.report(stepper.model, state)
    assert report["gmp/overall_sparsity"] == pytest.approx(0.9, abs=1.0 / total)


def test_global_scope_never_empties_a_layer():
    method, net, state = gmp("mlp", gmp_scope="global", final_sparsity=0.99,
                             prune_start_epoch=0.0, prune_end_epoch=0.0)
    net.net.fc3.kernel[...] = net.net.fc3.kernel[...] * 1e-3  # the smallest weights by far
    stepper = Stepper(method, net)
    got = masks(stepper(state, 0))
    assert all(m.sum() >= 1 for m in got.values())
    assert got["fc3"].sum() == 1


def unit_norms(net, name):
    kernel = np.abs(np.asarray(net.layer_module(name).kernel[...]))
    return kernel.reshape(-1, kernel.shape[-1]).sum(axis=0)


def test_unit_structure_zeroes_whole_units_by_smallest_l1_norm_with_their_batchnorm():
    method, net, state = gmp("resnet20", gmp_structure="unit", final_sparsity=0.5,
                             prune_start_epoch=0.0, prune_end_epoch=0.0)
    streams = {m for c in net.channel_couplings for m in c.layers}
    pruned_layers = set(state["masks"])
    classifier = net.layers[-1].name
    assert classifier not in pruned_layers and not pruned_layers & streams
    assert pruned_layers == {l.name for l in net.layers[:-1]} - streams
    norms = {name: unit_norms(net, name) for name in pruned_layers}
    stepper = Stepper(method, net)
    state = stepper(state, 0)
    state = stepper(state, 1, shift=1e-3)  # a later update must not revive the units
    model = stepper.model
    for name, mask in masks(state).items():
        assert mask.shape == (model.layer_module(name).kernel.shape[-1],)
        assert (~mask).sum() == round(0.5 * mask.size)
        assert norms[name][~mask].max() <= norms[name][mask].min()
        kernel = np.asarray(model.layer_module(name).kernel[...])
        assert np.all(kernel[..., ~mask] == 0)
        assert np.all(np.any(kernel[..., mask] != 0, axis=(0, 1, 2)))
        norm = model.module_at(f"net.{name.removesuffix('conv1')}bn1")  # a block's conv1 only
        assert np.all(np.asarray(norm.scale[...])[~mask] == 0)
        assert np.all(np.asarray(norm.bias[...])[~mask] == 0)
        assert np.all(np.asarray(norm.scale[...])[mask] != 0)
    # Layers that are not pruned by units keep every output unit (a block's conv2 loses the
    # rows that read its conv1's pruned units, members of those units).
    for name in streams | {classifier}:
        kernel = np.asarray(model.layer_module(name).kernel[...])
        assert np.all(np.any(kernel.reshape(-1, kernel.shape[-1]) != 0, axis=0)), name


def test_unit_structure_on_lenet5_zeroes_kernel_columns_and_biases_but_never_the_classes():
    method, net, state = gmp("lenet5", gmp_structure="unit", final_sparsity=0.7,
                             prune_start_epoch=0.0, prune_end_epoch=0.0)
    assert set(state["masks"]) == {"conv1", "conv2", "fc1"}
    norms = {name: unit_norms(net, name) for name in state["masks"]}
    stepper = Stepper(method, net)
    state = stepper(state, 0)
    state = stepper(state, 1, shift=1e-2)
    model = stepper.model
    for name, mask in masks(state).items():
        module = model.layer_module(name)
        assert norms[name][~mask].max() <= norms[name][mask].min()
        assert np.all(np.asarray(module.kernel[...])[..., ~mask] == 0)
        assert np.all(np.asarray(module.bias[...])[~mask] == 0)
        assert np.all(np.asarray(module.bias[...])[mask] != 0)
    assert np.all(np.asarray(model.layer_module("fc2").bias[...]) != 0)
    assert [mask.sum() for mask in masks(state).values()] == [6, 15, 150]


def test_unit_structure_global_scope_ranks_units_of_every_layer_together():
    method, net, state = gmp("lenet5", gmp_structure="unit", gmp_scope="global",
                             final_sparsity=0.5, prune_start_epoch=0.0, prune_end_epoch=0.0)
    mean_norms = {name: unit_norms(net, name) / np.prod(net.layer_module(name).kernel.shape[:-1])
                  for name in state["masks"]}
    got = masks(Stepper(method, net)(state, 0))
    pruned = np.concatenate([mean_norms[n][~m] for n, m in got.items()])
    kept = np.concatenate([mean_norms[n][m] for n, m in got.items()])
    assert pruned.max() <= kept.min()
    assert sum((~m).sum() for m in got.values()) == round(0.5 * 570)


def test_an_engine_run_reaches_its_sparsity_on_its_schedule(tmp_path):
    # 512 / 64 = 8 updates per epoch; the ramp ends at update 16, pruning every 3 updates.
    config = config_for(method="gmp", epochs=3, final_sparsity=0.8, prune_end_epoch=2.0,
                        prune_every=3)
    summary = train_and_evaluate(config, tmp_path / "run")
    assert summary["gmp/overall_sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert all(s == pytest.approx(0.8, abs=1e-3) for s in summary["gmp/sparsity"].values())
    method = create_method(
        "gmp",
        method_config("gmp", "mlp", epochs=3, final_sparsity=0.8, prune_end_epoch=2.0,
                      prune_every=3),
        RunInfo(num_train=512, steps_per_epoch=8, epochs=3),
    )
    rates = {r["epoch"]: r["sparsity/pruning_rate"]
             for r in read_metrics(tmp_path / "run") if "sparsity/pruning_rate" in r}
    # The engine's pruning rate counts the kernel weights that are zero or hang off a dead unit:
    # the masked fraction, plus a little.
    for epoch, rate in rates.items():
        target = 100 * float(method.target_sparsity(8 * epoch))
        assert target - 0.01 <= rate <= target + 1.0, (epoch, rate, target)
    assert 50 < rates[1] < 75 and rates[2] == rates[3] >= 80
