"""CIFAR-10/100 runs: ResNet-20/56/110, VGG-16/19, WRN-28-10, ResNet-164, DenseNet-40, MobileNetV2.

    python -m experiments.cifar --method=dep_l0 --model=resnet56 --dataset=cifar10

The schedule fields are None here: :func:`experiments.configs.recipes.resolve` gives them the
paper's values for the chosen model and method (override any with ``--config.NAME=VALUE``).
Training uses the CIFAR augmentation (4-pixel pad, random 32x32 crop, flip) and per-channel
normalisation; ``--dataset=synthetic`` makes CIFAR-shaped random data.
"""

import ml_collections
from ml_collections import config_dict

from sparsejax.train.config import shared_config, with_method

SCHEDULE_FIELDS = {
    "epochs": int, "batch_size": int, "optimizer": str, "learning_rate": float,
    "lr_schedule": str, "lr_milestones": tuple, "lr_factor": float, "weight_decay": float,
    "l2": float, "gate_optimizer": str, "gate_learning_rate": float, "gate_lr_schedule": str,
    "gate_lr_factor": float,
}
"""Shared fields left to the paper's recipe (type of each placeholder); the method's own fields
(e.g. Dep-L0's ``fine_tune_epochs``) are unset until resolved."""


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
    """The shared fields for CIFAR runs and the fields of ``method`` (None: dep_l0)."""
    config = shared_config()
    config.method = "dep_l0"
    config.model = "resnet56"
    config.dataset = "cifar10"
    config.synthetic_like = "cifar10"
    config.augment = "crop_flip"
    config.normalize = True
    config.eval_batch_size = 1000
    config.input_threads = 8
    for field, kind in SCHEDULE_FIELDS.items():
        config[field] = config_dict.placeholder(kind)
    return with_method(config, method)
