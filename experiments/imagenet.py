"""Train a gated ResNet-50 or MobileNetV2 on ImageNet with the papers' schedules.

    python -m experiments.imagenet --method=dep_l0 --model=resnet50
    python -m experiments.imagenet --method=l0_hc --model=resnet50 --dataset=synthetic \
        --config.num_train=1024 --config.num_test=256 --epochs=1

Unset schedule fields take the paper's values for the model and method
(``experiments/configs/recipes.py``); every field is overridable as ``--config.NAME=VALUE``.
Rerun the same command to resume.
"""

from sparsejax import host

host.configure()

from experiments import cli  # noqa: E402
from experiments.configs.recipes import resolve  # noqa: E402

if __name__ == "__main__":
    cli.run("imagenet", resolve)
