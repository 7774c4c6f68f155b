import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments.configs.mnist import get_config
from sparsejax.estimators import binary
from sparsejax.methods import METHODS, RunInfo, create_method, cross_entropy
from sparsejax.methods.dep_l0 import DEFAULT_LAMBDAS, generator_of
from sparsejax.methods.dep_penalty import dep_l0_penalty
from sparsejax.methods.penalties import gated_l2
from sparsejax.models.cifar_resnet import CifarResNet
from sparsejax.structure import gate_report
from sparsejax.structure.traced_model import build_zoo_model, gate_zoo_network
from sparsejax.train import train_and_evaluate
from sparsejax.train.state import merge_model, split_model
from tests.methods.test_methods import method_config

LAMBDA = 1e-3


def method_for(name, model="lenet5", run=RunInfo(num_train=1000, steps_per_epoch=10, epochs=2),
               **overrides):
    return create_method(name, method_config(name, model, **overrides), run)


def tiny_lenet(name="dep_l0", **overrides):
    """LeNet-5 on 16x16 images: conv 1->2, conv 2->3 (one 1x1 position left), dense 3-4-3."""
    method = method_for(name, **overrides)
    model = build_zoo_model("lenet5", rngs=nnx.Rngs(0), input_shape=(16, 16, 1), channels=(2, 3),
                            hidden=4, num_classes=3, gate_factory=method.make_gates)
    return method, model


def batch(n=6, shape=(16, 16, 1), classes=3):
    x = jax.random.uniform(jax.random.key(0), (n, *shape))
    return x, jnp.arange(n) % classes


def test_registry_defaults_and_config_errors():
    assert {"dep_l0", "dep_l0_arm"} <= set(METHODS)
    assert method_for("dep_l0", model="vgg16").penalty_lambda == 1e-6
    assert method_for("dep_l0", model="resnet56").penalty_lambda == 5e-7
    assert method_for("dep_l0", model="resnet56", dependency="backward").penalty_lambda == 1e-6
    assert method_for("dep_l0", model="resnet50").penalty_lambda == 5e-9
    assert method_for("dep_l0", model="lenet5", lamba=3e-7).penalty_lambda == 3e-7
    assert method_for("dep_l0", model="wrn_xyz").penalty_lambda == DEFAULT_LAMBDAS["*"]["forward"]
    with pytest.raises(ValueError, match="dependency must be one of"):
        method_for("dep_l0", dependency="sideways")
    with pytest.raises(ValueError, match="penalty_form must be one of"):
        method_for("dep_l0", penalty_form="quadratic")
    method = method_for("dep_l0")
    with pytest.raises(ValueError, match="granularity='unit'"):
        build_zoo_model(
            "lenet5", rngs=nnx.Rngs(0), gate_factory=method.make_gates, granularity="weight"
        )
    with pytest.raises(ValueError, match="gate_factory=method.make_gates"):
        generator_of(build_zoo_model("lenet5", rngs=nnx.Rngs(0)))


def test_penalty_of_lenet5_by_hand():
    """conv1: 25 * 1 * E1, conv2: 25 * E1 * E2 (product form); fc1 and fc2: |g| * sum q."""
    method, model = tiny_lenet(lamba=LAMBDA)
    q = {"conv1": jnp.array([0.5, 0.25]), "conv2": jnp.array([1.0, 0.5, 0.5]),
         "fc1": jnp.array([0.1, 0.2, 0.3]), "fc2": jnp.array([1.0, 1.0, 0.5, 0.5])}
    want = LAMBDA * (25 * 1 * 0.75 + 25 * 0.75 * 2.0 + 4 * 0.6 + 3 * 3.0)
    got = dep_l0_penalty(model.layers, model.gate_slots, q, LAMBDA)
    assert float(got) == pytest.approx(want, rel=1e-6)
    logits = generator_of(model)()
    keep = method.keep_probabilities(model, logits)
    assert float(method.penalty(model, {})) == pytest.approx(
        float(dep_l0_penalty(model.layers, model.gate_slots, keep, LAMBDA)
              + gated_l2(model, keep, method.l2)), rel=1e-6
    )


def tiny_mlp_of_ones(name, **overrides):
    """MLP 3-2-4 with every kernel and bias entry 1 (fc1 rows: |w|^2 = 2, fc2 rows: 4)."""
    method = method_for(name, model="mlp", lamba=LAMBDA, **overrides)
    model = build_zoo_model("mlp", rngs=nnx.Rngs(0), input_shape=(3, 1, 1), hidden=(2,),
                            num_classes=4, gate_factory=method.make_gates)
    for layer in (model.net.fc1, model.net.fc2):
        layer.kernel[...] = jnp.ones_like(layer.kernel[...])
        layer.bias[...] = jnp.ones_like(layer.bias[...])
    return method, model


def test_l2_is_the_gated_l2_of_the_l0_methods_by_hand():
    """Binary gates, logits 0 / 100: q = (1/2, 1/2, 1) on fc1's inputs, (1/2, 1) on fc2's.
    (l2/2) * (fc1: 2 * (1/2 + 1/2 + 1) + |b1|^2 2 + fc2: 4 * (1/2 + 1) + |b2|^2 4) = 8 * l2
    (biases ungated); R = lambda * (2 * 2 + 4 * 1.5)."""
    logits = {"fc1": jnp.array([0.0, 0.0, 100.0]), "fc2": jnp.array([0.0, 100.0])}
    for l2, want_l2 in ((0.0, 0.0), (0.01, 0.08), (5e-4, 4e-3)):
        method, model = tiny_mlp_of_ones("dep_l0_arm", l2=l2)
        got = method.penalty_from_logits(model, logits)
        assert float(got) == pytest.approx(LAMBDA * 10.0 + want_l2, rel=1e-6), l2


@pytest.mark.parametrize("name", ["dep_l0", "dep_l0_arm"])
def test_loss_changes_with_l2_by_the_gated_l2(name):
    """Same weights, generator and gate noise: the loss and ``penalty`` part grow by
    (l2/2) * sum over the layers of q * |row|^2 + |bias|^2, q from the generator."""
    x, y = jax.random.uniform(jax.random.key(0), (5, 3, 1, 1)), jnp.arange(5) % 4
    parts = {}
    for l2 in (0.0, 0.01):
        method, model = tiny_mlp_of_ones(name, l2=l2)
        loss, aux = method.objective(model, {}, x, y, jax.random.key(1))
        parts[l2] = (float(loss), float(aux["penalty"]), float(aux["data_loss"]))
    q = method.keep_probabilities(model, generator_of(model)())
    want = 0.5 * 0.01 * (2 * float(jnp.sum(q["fc1"])) + 2 + 4 * float(jnp.sum(q["fc2"])) + 4)
    assert parts[0.0][2] == parts[0.01][2]  # the same data term
    assert parts[0.01][0] - parts[0.0][0] == pytest.approx(want, rel=1e-5)
    assert parts[0.01][1] - parts[0.0][1] == pytest.approx(want, rel=1e-5)


def test_mlp_penalty_is_expected_l0_weighted_by_group_size():
    method = method_for("dep_l0", model="mlp", lamba=LAMBDA)
    model = build_zoo_model("mlp", rngs=nnx.Rngs(0), input_shape=(3, 1, 1), hidden=(2,),
                            num_classes=4, gate_factory=method.make_gates)
    q = {"fc1": jnp.array([0.5, 0.5, 1.0]), "fc2": jnp.array([0.25, 0.75])}
    got = dep_l0_penalty(model.layers, model.gate_slots, q, LAMBDA)
    assert float(got) == pytest.approx(LAMBDA * (2 * 2.0 + 4 * 1.0), rel=1e-6)


def resnet20_halves():
    method = method_for("dep_l0", model="resnet20")
    model = nnx.eval_shape(lambda: build_zoo_model(
        "resnet20", rngs=nnx.Rngs(0), input_shape=(8, 8, 3), gate_factory=method.make_gates))
    return model, {s.name: jnp.full(s.shape, 0.5) for s in model.gate_slots}


def test_resnet_penalty_forms_by_hand():
    """Every gate at q = 1/2 in ResNet-20 (widths 16/32/64, three blocks per stage)."""
    model, q = resnet20_halves()
    inputs = [16, 16, 16, 16, 32, 32, 32, 64, 64]  # each block's conv1 input width
    widths = [16, 16, 16, 32, 32, 32, 64, 64, 64]
    # The traced layers: the stem reads the image, block 1's conv1 reads the gated stem, later
    # conv1s read the ungated residual stream; every conv2 reads its conv1's gated channels.
    layers = 9 * 3 * 8 + 9 * 8 * 8 + 9 * 8 * 16
    for c_in, width in list(zip(inputs, widths))[1:]:
        layers += 9 * c_in * (width / 2) + 9 * (width / 2) * width
    # The reference chain: each gated conv reads the previous gate's channels; no conv2.
    expected = [8] + [w / 2 for w in widths]
    chain = 9 * 3 * 8 + sum(9 * a * b for a, b in itertools.pairwise(expected))
    # ResNet-50's reference: k^4 * full input width * E_out.
    k4 = 81 * 3 * 8 + sum(81 * c_in * w / 2 for c_in, w in zip(inputs, widths))
    for form, want in (("layers", layers), ("reference_chain", chain), ("reference_k4", k4)):
        got = dep_l0_penalty(model.layers, model.gate_slots, q, LAMBDA, form=form)
        assert float(got) == pytest.approx(LAMBDA * want, rel=1e-6), form
    assert layers > chain


def test_vgg_layers_form_is_the_reference_chain():
    method = method_for("dep_l0", model="vgg16")
    model = build_zoo_model("vgg16", rngs=nnx.Rngs(0), input_shape=(8, 8, 3),
                            config=(4, "M", 6, 5, "M"), gate_factory=method.make_gates)
    q = {"conv1": jnp.array([0.5, 1.0, 0.5, 0.0]), "conv2": jnp.full(6, 0.5),
         "conv3": jnp.array([0.2, 0.2, 0.2, 0.2, 0.2])}
    want = LAMBDA * (9 * 3 * 2.0 + 9 * 2.0 * 3.0 + 9 * 3.0 * 1.0)
    for form in ("layers", "reference_chain"):
        got = dep_l0_penalty(model.layers, model.gate_slots, q, LAMBDA, form=form)
        assert float(got) == pytest.approx(want, rel=1e-6), form


def gradients(method, model, x, y):
    graphdef, params, rest = split_model(model)

    def loss(p):
        return method.objective(merge_model(graphdef, p, rest), {}, x, y, jax.random.key(1))[0]

    return params, jax.jit(jax.grad(loss))(params)


def one_update(method, params, grads):
    tx = method.optimizer()
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)


def changed(before, after):
    return any(np.any(a != b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


@pytest.mark.parametrize("name", ["dep_l0", "dep_l0_arm"])
def test_each_group_is_trained_by_its_own_optimizer(name):
    """Network: SGD + momentum 0.9 + weight decay; generator: Adam 1e-3 by default."""
    x, y = batch()
    settings = {"optimizer": "momentum", "learning_rate": 0.1, "weight_decay": 0.01}
    method, model = tiny_lenet(name, **settings)
    params, grads = gradients(method, model, x, y)
    for group in ("net", "gates"):
        leaves = jax.tree.leaves(grads[group])
        assert all(np.all(np.isfinite(g)) for g in leaves)
        assert any(np.any(g != 0) for g in leaves), group
    new = one_update(method, params, grads)
    for w, g, w_new in zip(*(jax.tree.leaves(t["net"]) for t in (params, grads, new))):
        np.testing.assert_allclose(w_new, w - 0.1 * (g + 0.01 * w), rtol=1e-5, atol=1e-7)
    for w, g, w_new in zip(*(jax.tree.leaves(t["gates"]) for t in (params, grads, new))):
        moved = np.abs(np.asarray(g)) > 1e-4  # Adam's first step is lr * sign(g)
        np.testing.assert_allclose(np.abs(w_new - w)[moved], 1e-3, rtol=1e-2)

    new = one_update(method_for(name, **settings, gate_learning_rate=0.0), params, grads)
    assert changed(params["net"], new["net"]) and not changed(params["gates"], new["gates"])
    new = one_update(method_for(name, **{**settings, "learning_rate": 0.0}), params, grads)
    assert not changed(params["net"], new["net"]) and changed(params["gates"], new["gates"])


def tiny_mlp(per_example):
    method = method_for("dep_l0_arm", model="mlp", lamba=0.0, per_example_gates=per_example)
    model = build_zoo_model("mlp", rngs=nnx.Rngs(0), input_shape=(2, 1, 1), hidden=(2,),
                            num_classes=2, gate_factory=method.make_gates)
    for layer, bias in zip(generator_of(model).layers, ([0.3, -0.2], [0.1, 0.4])):
        layer.kernel[...] = 0.1 * layer.kernel[...]
        layer.bias[...] = jnp.array(bias)
    return method, model


@pytest.mark.parametrize("per_example", [False, True])
def test_arm_generator_gradient_is_the_chain_rule_on_the_exact_gradient(per_example):
    """The generator gradient of the dep_l0_arm objective, averaged over noise, equals the
    gradient of E_z[mean CE] obtained by enumerating the 2^4 gate settings of a 2-2-2 MLP, with
    pi = sigmoid(generator logits)."""
    method, model = tiny_mlp(per_example)
    graphdef, params, rest = split_model(model)
    x = jnp.array([[1.0, -2.0], [0.5, 1.5], [-1.0, 0.3]]).reshape(3, 2, 1, 1)
    y = jnp.array([0, 1, 1])

    def exact(gate_params):
        net = merge_model(graphdef, {**params, "gates": gate_params}, rest)
        pis = {n: jax.nn.sigmoid(v) for n, v in generator_of(net)().items()}
        total = 0.0
        for bits in itertools.product([0.0, 1.0], repeat=4):
            z = {"fc1": jnp.array(bits[:2]), "fc2": jnp.array(bits[2:])}
            weight = jnp.prod(jnp.stack(
                [jnp.prod(jnp.where(z[n] > 0, pis[n], 1 - pis[n])) for n in z]
            ))
            total = total + weight * jnp.mean(cross_entropy(net(x, train=True, gates=z), y))
        return total

    pis = jax.nn.sigmoid(jnp.concatenate(list(generator_of(model)().values())))
    assert 0.1 < float(pis.min()) and float(pis.max()) < 0.9
    exact_grad = jax.grad(exact)(params["gates"])

    def estimate(key):
        def loss(gate_params):
            net = merge_model(graphdef, {**params, "gates": gate_params}, rest)
            return method.objective(net, {}, x, y, key)[0]

        return jax.grad(loss)(params["gates"])

    samples = jax.jit(jax.vmap(estimate))(jax.random.split(jax.random.key(0), 40000))
    for est, ref in zip(jax.tree.leaves(samples), jax.tree.leaves(exact_grad)):
        mean = est.mean(0)
        stderr = est.std(0) / np.sqrt(est.shape[0])
        assert np.any(np.abs(ref) > 1e-3)
        np.testing.assert_array_less(np.abs(mean - ref), 5 * stderr + 1e-6)


@pytest.mark.parametrize("name", ["dep_l0", "dep_l0_arm"])
def test_fine_tuning_freezes_the_generator_at_deterministic_gates(name):
    method, model = tiny_lenet(name, run=RunInfo(1000, 10, 3), fine_tune_epochs=1)
    training, fine_tuning = method.phases()
    assert (training.method, training.epochs) == (method, 2)
    tuning = fine_tuning.method
    assert tuning is not method and tuning.fine_tuning and fine_tuning.epochs == 1
    assert fine_tuning.optimizer is None  # the same optimizer and state go on
    assert tuning.fine_tune_phase is tuning

    x, y = batch()
    graphdef, params, rest = split_model(model)

    def objective(p):
        return tuning.objective(merge_model(graphdef, p, rest), {}, x, y, jax.random.key(1))

    (loss, parts), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    keep = tuning.keep_probabilities(model, generator_of(model)())
    assert tuning.l2 == 5e-4  # the MNIST configs' L2 stays; the sparsity penalty goes
    assert float(parts["penalty"]) == pytest.approx(float(gated_l2(model, keep, 5e-4)), rel=1e-6)
    assert float(loss) == pytest.approx(float(parts["data_loss"] + parts["penalty"]), rel=1e-6)
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads["gates"]))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads["net"]))
    np.testing.assert_allclose(parts["logits"], model(x, train=False), rtol=1e-6)


def test_generator_learning_rate_is_exactly_zero_from_the_fine_tuning_boundary():
    method, model = tiny_lenet("dep_l0", run=RunInfo(1000, 2, 3), fine_tune_epochs=1)
    _, params, _ = split_model(model)
    tx = method.optimizer()  # fine-tuning from update 4 on
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    moved = []
    for _ in range(6):
        updates, state = tx.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        moved.append((changed(params["net"], new["net"]), changed(params["gates"], new["gates"])))
        params = new
    assert moved == [(True, True)] * 4 + [(True, False)] * 2
    with pytest.raises(ValueError, match="fine_tune_epochs"):
        tiny_lenet("dep_l0", run=RunInfo(1000, 2, 1), fine_tune_epochs=1)


def test_arm_objective_updates_batchnorm_statistics_once():
    """The antithetic pass must not move BatchNorm statistics: after the objective they equal
    those of one training pass on the main gates the estimator drew."""
    method = method_for("dep_l0_arm", model="resnet8")
    rngs = nnx.Rngs(0)
    net = gate_zoo_network(CifarResNet(depth=8, rngs=rngs, input_shape=(8, 8, 3)), "resnet20",
                           rngs=rngs, gate_factory=method.make_gates)
    graphdef, params, rest = split_model(net)
    x, y = batch(4, (8, 8, 3), 10)
    key = jax.random.key(1)
    drawn = []
    binary.expectation(lambda z: drawn.append(z) or jnp.zeros(()), generator_of(net)(), key, k=1.0)

    @jax.jit
    def statistics(rest):
        model = merge_model(graphdef, params, rest)
        method.objective(model, {}, x, y, key)
        after = nnx.state(model, nnx.BatchStat)
        model = merge_model(graphdef, params, rest)
        model(x, train=True, gates=drawn[0])
        return after, nnx.state(model, nnx.BatchStat)

    after, reference = (jax.tree.leaves(s) for s in statistics(rest))
    initial = jax.tree.leaves(nnx.state(net, nnx.BatchStat))
    assert any(not np.allclose(a, b) for a, b in zip(reference, initial))
    for got, want in zip(after, reference):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["dep_l0", "dep_l0_arm"])
def test_reports_and_eval_read_the_generated_gates(name):
    _, model = tiny_lenet(name)
    generator = generator_of(model)
    last = generator.layers[-1]  # close every other gate of the chain's last slot
    last.bias[...] = last.bias[...].at[::2].set(-50.0)
    logits = generator()
    report = gate_report(model)
    closed_slot = generator.chain_order()[-1]
    expected = {n: int(np.sum(g.deterministic(logits[n]) > 0)) for n, g in model.gates.items()}
    assert report.active_units == expected
    assert expected[closed_slot] <= report.slot_sizes[closed_slot] // 2  # some gates closed
    x, _ = batch()
    explicit = {n: g.deterministic(logits[n]) for n, g in model.gates.items()}
    np.testing.assert_allclose(
        model(x, train=False), model(x, train=True, gates=explicit), rtol=1e-6
    )


def test_training_run_writes_a_summary(tmp_path):
    config = get_config()
    config.update(
        dataset="synthetic", model="mlp", method="dep_l0", dependency="backward", epochs=1,
        batch_size=64, num_train=256, num_test=128, log_every=2, eval_batch_size=128,
    )
    summary = train_and_evaluate(config, tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["method"] == "dep_l0" and len(summary["active_units"]) == 3
    assert summary["test_error"] is not None and summary["params"] <= summary["dense_params"]


def test_training_run_fine_tunes_its_last_epoch_with_frozen_gates_and_no_penalty(tmp_path):
    config = get_config()
    config.update(
        dataset="synthetic", model="mlp", method="dep_l0", epochs=2, fine_tune_epochs=1, l2=0.0,
        batch_size=64, num_train=256, num_test=128, log_every=2, eval_batch_size=128,
        steps_per_epoch=4,
    )
    train_and_evaluate(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    penalties = [(r["epoch"], r["train/penalty"]) for r in records if "train/penalty" in r]
    assert all(value > 0 for epoch, value in penalties if epoch <= 1)
    assert all(value == 0 for epoch, value in penalties if epoch > 1)
    units = [r["sparsity/active_units"] for r in records if "sparsity/active_units" in r]
    assert len(units) == 2 and units[0] == units[1]
