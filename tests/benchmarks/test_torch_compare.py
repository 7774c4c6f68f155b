import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import make_steps, seconds_per_step  # noqa: E402
from benchmarks.torch_compare import TORCH_MODELS, torch_steps  # noqa: E402
from sparsejax.structure.traced_model import build_zoo_model  # noqa: E402


@pytest.mark.parametrize("name", sorted(TORCH_MODELS))
def test_torch_networks_have_the_shapes_of_sparsejax_models(name):
    params = nnx.state(build_zoo_model(name, rngs=nnx.Rngs(0)), nnx.Param)
    ours = sorted(x.size for x in jax.tree.leaves(params))
    theirs = sorted(p.numel() for p in TORCH_MODELS[name]().parameters())
    assert ours == theirs


def test_both_kinds_of_step_run():
    for run in (torch_steps("mlp", 4, 2), make_steps("l0_hc", "mlp", 4, 2, "fashion_mnist")):
        assert seconds_per_step(run, 2) > 0
