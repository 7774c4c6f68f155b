"""The papers' training schedules, per model, and how a config's unset fields take them.

CIFAR and ImageNet configs leave the schedule fields None, meaning "the paper's value for this
model (and method)"; :func:`resolve` fills them once the command line has chosen the method,
model and dataset, so ``config.json`` of a run records the values actually used.

Sources (see BUILD_NOTES.md for the details and the deviations):
- ResNet-20/56/110 and VGG-16: Dep-L0 (Li & Ji 2021) code: SGD momentum 0.9, lr 0.1 (VGG 0.05),
  x0.1 (VGG x0.2) at epochs 60/120/180/240, 300 epochs, batch 128, weight decay 5e-4; gate
  parameters Adam 1e-3 on the same milestones.
- WRN-28-10: L0-HC (Louizos et al. 2018) code: SGD Nesterov 0.9, lr 0.1, x0.2 at 60/120/160,
  200 epochs, batch 128; the L2 term 5e-4 is in the loss (the gated expectation) and every
  parameter, gates included, shares the one SGD optimizer.
- ResNet-164, DenseNet-40, MobileNetV2 (CIFAR): the network-slimming schedule the bounded-Lp
  paper compares with: SGD momentum 0.9, lr 0.1, x0.1 at 50% and 75% of 160 epochs, batch 64,
  weight decay 1e-4.
- ResNet-50 (ImageNet): SGD momentum 0.9, lr 0.1 for batch 256, x0.1 at 30/60/90, 100 epochs,
  weight decay 1e-4. Dep-L0 code: the last 10 of the 100 epochs fine-tune with frozen gates, and
  the generator's Adam 1e-3 is multiplied by 0.2 (not 0.1) at the milestones.
- MobileNetV2 (ImageNet): SGD momentum 0.9, lr 0.05 for batch 256, cosine over 150 epochs,
  weight decay 4e-5.
- VGG-19 (CIFAR-100, GReg's network): the GReg README's pretraining: SGD momentum 0.9, lr 0.1,
  x0.1 at 100/150, 200 epochs, batch 256, weight decay 5e-4.
- ResNet-34 (ImageNet, GReg's network): GReg starts from torchvision's pretrained weights, whose
  recipe (torchvision ``references/classification``) is SGD momentum 0.9, lr 0.1 for batch 256,
  x0.1 at 30/60, 90 epochs, weight decay 1e-4.

What depends on the method:
- Stochastic-gate methods (L0-HC, L0-ARM/AR, Dep-L0) train their gate parameters with a separate
  Adam at 1e-3 (Dep-L0 code), except on WRN-28-10.
- Dep-L0's L2 is the optimizer's ``weight_decay`` on its CIFAR and ImageNet schedules, as in its
  code; ``l2`` (the gated L2 in the loss, which Dep-L0 reads like the L0 methods) is 0 there
  (``FALLBACK``), so the decay is not doubled. On WRN-28-10 (L0-HC's recipe: no weight decay,
  ``l2`` 5e-4 in the loss) every method, Dep-L0 included, has its L2 in the loss.
- The proximal gate methods (``l1``, ``bounded_lp``) get no separate gate optimizer: network
  slimming trains its channel scales (BatchNorm gamma) with the network's SGD, learning rate and
  schedule, and so do these methods' gates (without weight decay); the prox step size is that
  learning rate. Slimming adds lambda * sign(gamma) to the gradient, so SGD momentum m multiplies
  its steady pull by 1 / (1 - m), which a prox step after the update does not: on these
  schedules (m = 0.9) a gate_lambda of 10 s matches slimming's sparsity weight s.
- Stochastic pruning has no gates; its L2 is the recipe's weight decay (``l2`` 0) and its L1
  ``l1`` (None: the per-model defaults of ``stochastic.FIELDS``, which for VGG-16 end the
  pruning ramp at a third of the 300 epochs).
- GReg (``greg1``, ``greg2``) plans its run's length (``epochs`` stays unset): it pretrains
  for ``pretrain_epochs`` on the model's schedule (VGG-19 200, ResNet-34 90, ResNet-56 200 on
  GReg's own steps, :data:`GREG_SCHEDULES`), regularises, stabilises and prunes at the constant
  ``lr_prune`` 1e-3, then fine-tunes on a fresh optimizer at ``lr_ft`` for
  ``fine_tune_epochs`` (120 on CIFAR at 0.01, x0.1 at 60 and 90; 90 on ImageNet at 0.01, x0.1
  at 30, 60 and 75), as the reference. The stage ratios are the paper's (VGG-19
  ``[1-15:0.7]``, 8.84x; ResNet-34 ``[0,0.5,0.6,0.4,0,0]``, whose 1.32x also needs the
  reference's ``--skip_layers``, not supported: without them 1.62x), K_u 10 / 5,
  K_s 10 000 / 40 000: GReg's field defaults per model.
- Penalty weights (``gate_lambda``, ``sigma``, ``final_sparsity``, ``l1``, ...) are not schedule
  fields: the methods' tables give them per model when they are None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from sparsejax.methods import method_class
from sparsejax.train.config import SHARED_FIELDS

DEP_L0_CIFAR = {"optimizer": "momentum", "lr_schedule": "step", "weight_decay": 5e-4,
                "lr_milestones": (60, 120, 180, 240), "epochs": 300, "batch_size": 128}
SLIMMING_CIFAR = {"optimizer": "momentum", "learning_rate": 0.1, "lr_schedule": "step",
                  "lr_milestones": (80, 120), "lr_factor": 0.1, "weight_decay": 1e-4,
                  "epochs": 160, "batch_size": 64}

MODEL_SCHEDULES: dict[str, dict[str, Any]] = {
    **{
        name: {**DEP_L0_CIFAR, "learning_rate": 0.1, "lr_factor": 0.1}
        for name in ("resnet20", "resnet56", "resnet110")
    },
    "vgg16": {**DEP_L0_CIFAR, "learning_rate": 0.05, "lr_factor": 0.2},
    "wrn28_10": {"optimizer": "nesterov", "learning_rate": 0.1, "lr_schedule": "step",
                 "lr_milestones": (60, 120, 160), "lr_factor": 0.2, "weight_decay": 0.0,
                 "l2": 5e-4, "epochs": 200, "batch_size": 128},
    "resnet164": SLIMMING_CIFAR,
    "densenet40": SLIMMING_CIFAR,
    "mobilenet_v2_cifar": SLIMMING_CIFAR,
    "resnet50": {"optimizer": "momentum", "learning_rate": 0.1, "lr_schedule": "step",
                 "lr_milestones": (30, 60, 90), "lr_factor": 0.1, "weight_decay": 1e-4,
                 "epochs": 100, "batch_size": 256},
    "mobilenet_v2": {"optimizer": "momentum", "learning_rate": 0.05, "lr_schedule": "cosine",
                     "weight_decay": 4e-5, "epochs": 150, "batch_size": 256},
    "vgg19": {"optimizer": "momentum", "learning_rate": 0.1, "lr_schedule": "step",
              "lr_milestones": (100, 150), "lr_factor": 0.1, "weight_decay": 5e-4,
              "epochs": 200, "batch_size": 256},
    "resnet34": {"optimizer": "momentum", "learning_rate": 0.1, "lr_schedule": "step",
                 "lr_milestones": (30, 60), "lr_factor": 0.1, "weight_decay": 1e-4,
                 "epochs": 90, "batch_size": 256},
}
"""The network's schedule per model (all methods)."""

GREG_METHODS = ("greg1", "greg2")

GREG_SCHEDULES: dict[str, dict[str, Any]] = {
    "resnet56": {"lr_milestones": (100, 150), "lr_factor": 0.1},
}
"""GReg's pretraining schedule where it differs from the model's (Wang et al. 2021, README):
ResNet-56 pretrains on GReg's own steps (x0.1 at 100 and 150 of 200 epochs, not the Dep-L0
recipe's 60/120/180/240). GReg's own settings (stage ratios, K_u, K_s, the phases' lengths and
learning rates) are its fields' per-model defaults (``sparsejax.methods.greg.FIELDS``)."""

SEPARATE_GATE_OPTIMIZER = {"gate_optimizer": "adam", "gate_learning_rate": 1e-3}
"""Stochastic-gate methods train gate parameters with Adam (Dep-L0 recipe), on the network's
milestones; WRN-28-10 (L0-HC recipe) keeps one optimizer for everything."""

STOCHASTIC_GATE_METHODS = ("l0_hc", "l0_arm", "l0_ar", "dep_l0", "dep_l0_arm")
DEP_L0_METHODS = ("dep_l0", "dep_l0_arm")

DEP_L0_IMAGENET = {"fine_tune_epochs": 10, "gate_lr_factor": 0.2}
"""Dep-L0's ResNet-50 script: 90 epochs with the penalty, then 10 with frozen gates; the
generator's learning rate falls by 0.2 at each milestone."""

PROXIMAL_GATE_METHODS = ("l1", "bounded_lp")

MNIST_PROXIMAL_GATE_RATE = 1e-2
"""Gate learning rate (Adam, and so the prox step size) of ``l1`` / ``bounded_lp`` on the
MNIST-family configs, whose other parameters train with Adam at 1e-3. Measured on LeNet-5 /
Fashion-MNIST (BUILD_NOTES.md): at 1e-3 the prox moves a gate by at most 1e-3 * gate_lambda per
step, so no gate reached zero in two epochs even at gate_lambda = 0.3, and a gate_lambda near 1
would let the penalty outrun Adam's largest step on every gate; at 1e-2 gate_lambda = 0.1 removes
80% of the parameters in five epochs."""

FALLBACK = {"optimizer": "momentum", "learning_rate": 0.1, "lr_schedule": "cosine",
            "lr_milestones": (), "lr_factor": 0.1, "weight_decay": 5e-4, "l2": 0.0,
            "epochs": 200, "batch_size": 128}
"""For a model without a paper schedule."""


def recipe(method: str, model: str) -> dict[str, Any]:
    """The paper's values of the schedule fields for ``method`` training ``model``."""
    values: dict[str, Any] = {**FALLBACK, **MODEL_SCHEDULES.get(model, {})}
    if method in STOCHASTIC_GATE_METHODS and model != "wrn28_10":
        values.update(SEPARATE_GATE_OPTIMIZER, gate_lr_schedule=values["lr_schedule"])
    if method in DEP_L0_METHODS and model == "resnet50":
        values.update(DEP_L0_IMAGENET)
    if method in GREG_METHODS:
        values.update(GREG_SCHEDULES.get(model, {}))
    if method_class(method).plans_length:
        del values["epochs"]
    return values


def resolve(config: ml_collections.ConfigDict, overrides: Mapping[str, Any] = ()) -> None:
    """Fill every field of ``config`` that is None with the recipe's value (``overrides`` first),
    among the shared fields and the method's own;
    an ``eval_batch_size`` left None is the batch size."""
    values = {**recipe(config.method, config.model), **dict(overrides)}
    applicable = SHARED_FIELDS | set(method_class(config.method).fields)
    for field, value in values.items():
        if field in applicable and field in config and config[field] is None:
            config[field] = value
    if "eval_batch_size" in config and config.eval_batch_size is None:
        config.eval_batch_size = config.batch_size


def resolve_mnist(config: ml_collections.ConfigDict) -> None:
    """The MNIST-family configs set their schedule; only the gate learning rate of the proximal
    gate methods, when None, is the recipe's (:data:`MNIST_PROXIMAL_GATE_RATE`)."""
    if config.method in PROXIMAL_GATE_METHODS and config.get("gate_learning_rate") is None:
        config.gate_learning_rate = MNIST_PROXIMAL_GATE_RATE
