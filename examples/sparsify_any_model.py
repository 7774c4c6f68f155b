"""Gate your own Flax NNX model and train it in your own optax loop."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sparsejax


class Net(nnx.Module):  # any NNX model: nothing to declare
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.fc1 = nnx.Linear(8 * 14 * 14, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(jax.nn.relu(self.bn(self.conv(x))), (2, 2), (2, 2))
        return self.fc2(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1))))


images = jax.random.uniform(jax.random.key(0), (256, 28, 28, 1))  # your data here
labels = jax.random.randint(jax.random.key(1), (256,), 0, 10)

# One hard-concrete gate per prunable unit group (here conv channels and fc1 neurons).
gated = sparsejax.sparsify(Net(rngs=nnx.Rngs(0)), images[:1], method="l0_hc")
optimizer = nnx.Optimizer(gated, optax.adam(1e-3), wrt=nnx.Param)  # weights and gates
lam = 1e-4  # weight of the expected L0 (number of parameters kept, in expectation)


@nnx.jit
def train_step(gated, optimizer, x, y, key):
    def loss_fn(gated):
        logits = gated(x, rngs=nnx.Rngs(gates=key))  # a fresh gate draw per step
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + lam * gated.penalty()

    loss, grads = nnx.value_and_grad(loss_fn)(gated)
    optimizer.update(gated, grads)
    return loss


key = jax.random.key(42)
for step in range(20):
    key, gate_key = jax.random.split(key)
    batch = jnp.arange(step * 64, (step + 1) * 64) % len(images)
    loss = train_step(gated, optimizer, images[batch], labels[batch], gate_key)

gated.eval()  # deterministic test-time gates; BatchNorm uses its running statistics
logits = gated(images[:8])
report = gated.report()
print(f"kept units {report.architecture}, params {report.params_fraction:.1%}, "
      f"FLOPs {report.flops_fraction:.1%}")
