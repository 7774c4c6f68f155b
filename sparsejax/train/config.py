"""A run's config: the fields every run shares (data, model, optimizer, schedule, run control)
plus the fields the chosen method declares (:attr:`Method.fields`).

An experiment's config file starts from :func:`shared_config`, sets its own defaults and adds
the method's fields with :func:`with_method`. :func:`resolve_config` refuses a field that is
neither shared nor the method's (another method's fields left unset are dropped), before any
data or model is built, and gives the method's unset fields their defaults for the model: the
values a run writes to ``config.json``.
"""

from __future__ import annotations

import copy

import ml_collections
from ml_collections import config_dict

from sparsejax.methods import METHODS, Method, method_class
from sparsejax.methods import fields as config_fields
from sparsejax.methods.fields import add_fields, check_known

CONFIG_FORMAT = 3
"""Version of the layout of a run directory's ``config.json`` and checkpoints (stored under
:data:`FORMAT_KEY`): 2 since methods declare their fields and keep their state out of the model
and the train state holds the parameter average (``ema_params``); 3 since the optimizer state
keeps each group's learning rate and the progress record the phases begun. Runs of another
format were written by another sparsejax."""
FORMAT_KEY = "config_format"


def shared_config() -> ml_collections.ConfigDict:
    """The fields every run has, at the library's defaults (an MNIST-sized run)."""
    config = ml_collections.ConfigDict()
    config.method = "l0_hc"
    config.model = "lenet5"
    config.dataset = "fashion_mnist"
    config.synthetic_like = "fashion_mnist"
    config.data_dir = config_dict.placeholder(str)
    config.num_train = config_dict.placeholder(int)
    config.num_test = config_dict.placeholder(int)
    config.seed = 0
    config.epochs = 10
    config.batch_size = 100
    config.steps_per_epoch = config_dict.placeholder(int)
    config.eval_batch_size = 1000
    config.log_every = 100
    # training steps per dispatch of the jitted program, run in a lax.scan (0: 10 for a model
    # without convolutions, else 1; sparsejax.train.dispatch); results do not depend on it
    config.steps_per_dispatch = 0
    config.augment = "none"
    config.normalize = False
    config.input_workers = 0
    config.input_threads = 4
    config.keep_checkpoints = 2
    # devices along the mesh's second axis that split each large parameter and its optimizer
    # state (FSDP); 1: replicated (plain data parallelism). Must divide the device count; a run
    # may resume with another value (onto another mesh shape).
    config.fsdp = 1

    config.optimizer = "adam"
    config.learning_rate = 1e-3
    config.lr_schedule = "constant"
    config.lr_milestones = ()
    config.lr_factor = 0.1
    config.weight_decay = 0.0
    config.gate_optimizer = config_dict.placeholder(str)
    config.gate_learning_rate = config_dict.placeholder(float)
    config.gate_lr_schedule = config_dict.placeholder(str)
    config.gate_lr_factor = config_dict.placeholder(float)

    config.granularity = "unit"
    config.l2 = 5e-4  # (l2/2)||theta||^2 in the loss; stochastic: the L2 of the study
    # decay of the parameter average evaluated instead of the parameters (0: off; None: the
    # method's default for the model, Method.ema_default: 0.999 for l0_hc on the MLP)
    config.ema_decay = config_dict.placeholder(float)
    return config


SHARED_FIELDS: frozenset[str] = frozenset(shared_config().keys())


def with_method(config: ml_collections.ConfigDict, method: str | None) -> ml_collections.ConfigDict:
    """``config`` for ``method`` (None: ``config.method``): its name and its own fields, unset,
    and ``epochs`` unset for a method that plans the run's length (:attr:`Method.plans_length`)."""
    name = method or config.method
    cls = method_class(name)
    extended = add_fields(config, cls.fields)
    extended.method = name
    if cls.plans_length:
        extended.epochs = config_dict.placeholder(int)
    return extended


def resolve_config(
    config: ml_collections.ConfigDict,
) -> tuple[type[Method], ml_collections.ConfigDict]:
    """The method class of ``config`` and the config with the method's unset fields, and
    ``ema_decay`` when unset (:attr:`Method.ema_default`), at their defaults for the model.

    Raises:
      ConfigError: for a field that is neither shared nor the method's, or an unknown method.
    """
    cls = method_class(config.method)
    config = _without_unset_foreign_fields(config, cls)
    check_known(config, cls.fields, config.method, SHARED_FIELDS)
    config = config_fields.resolve(cls.resolve(config), {"ema_decay": cls.ema_default})
    return cls, config


def _without_unset_foreign_fields(
    config: ml_collections.ConfigDict, cls: type[Method]
) -> ml_collections.ConfigDict:
    """``config`` without the fields of other registered methods that are unset (None), which
    a config built for one method and switched to another carries harmlessly."""
    foreign = {name for other in METHODS.values() for name in other.fields}
    foreign -= set(cls.fields) | SHARED_FIELDS
    dropped = [key for key in config.keys() if key in foreign and config[key] is None]
    if not dropped:
        return config
    kept = copy.deepcopy(config)
    with kept.unlocked():
        for key in dropped:
            del kept[key]
    return kept
