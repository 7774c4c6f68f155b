"""MNIST-family runs (LeNet-300-100, LeNet-5-Caffe) as in Louizos et al. (2018) and Li & Ji (2019).

    python -m experiments.mnist --method=l0_hc --model=lenet5 --dataset=fashion_mnist \
        --epochs=200 --workdir=runs/lenet5_l0_hc --config.lambdas="(10,0.5,0.1,10)"

Adam at 1e-3 for every parameter, batch 100, no schedule: the shared fields of
:func:`sparsejax.train.config.shared_config`. ``experiments.mnist`` gives the gates of ``l1`` and
``bounded_lp`` ``recipes.MNIST_PROXIMAL_GATE_RATE`` when ``gate_learning_rate`` is None.

The method's own fields (``Method.fields`` of its class, e.g. ``lambdas`` of ``l0_hc``, per gate
slot in units of 1/N) are added for the method of ``--method``, which the command line passes
as this file's argument; left None, they take the method's default for the model.
"""

import ml_collections

from sparsejax.train.config import shared_config, with_method


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
    """The shared fields for MNIST-family runs and the fields of ``method`` (None: l0_hc)."""
    return with_method(shared_config(), method)
