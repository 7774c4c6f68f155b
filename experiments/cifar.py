"""Train a gated network on CIFAR-10/100 with the papers' schedules.

    python -m experiments.cifar --method=dep_l0 --model=resnet56 --dataset=cifar10
    python -m experiments.cifar --method=l0_hc --model=wrn28_10 --dataset=cifar100 \
        --data_dir=~/data/cifar-100-python.tar.gz

The data is read from ``--data_dir`` (the python tarball or its folder), ``$SPARSEJAX_DATA_DIR``
or prepared tfds data; ``--dataset=synthetic`` trains on CIFAR-shaped random data. Unset schedule
fields take the paper's values for the model and method (``experiments/configs/recipes.py``);
every field is overridable as ``--config.NAME=VALUE``. Rerun the same command to resume.
"""

from sparsejax import host

host.configure()

from experiments import cli  # noqa: E402
from experiments.configs.recipes import resolve  # noqa: E402

if __name__ == "__main__":
    cli.run("cifar", resolve)
