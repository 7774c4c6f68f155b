"""MNIST-family runs (LeNet-300-100, LeNet-5-Caffe) as in Louizos et al. (2018) and Li & Ji (2019).

    python -m experiments.mnist --method=l0_hc --model=lenet5 --dataset=fashion_mnist \
        --epochs=200 --workdir=runs/lenet5_l0_hc --config.lambdas="(10,0.5,0.1,10)"

Adam at 1e-3 for every parameter, batch 100, no schedule; ``experiments.mnist`` gives the gates
of ``l1`` and ``bounded_lp`` ``recipes.MNIST_PROXIMAL_GATE_RATE`` when ``gate_learning_rate`` is
None. ``lambdas`` are per gate slot in units of 1/N (None: the paper's for the model: MLP
(0.1, 0.1, 0.1), LeNet-5 (10, 0.5, 0.1, 10)).
Dep-L0 (``dep_l0``, ``dep_l0_arm``) reads ``dependency``, ``lamba`` (one lambda per expected
weight, no 1/N; None: the method's default for the model and dependency), ``penalty_form``,
``fine_tune_epochs`` and ``generator_input_width``.
Gate sparsity (``l1``, ``bounded_lp``) reads ``gate_lambda`` (one value or one per slot, in loss
units), ``sigma``, ``p``, ``filter_lambda``, ``filter_sigma``, ``gate_threshold``; stochastic
pruning (``stochastic``) reads ``final_sparsity`` (one value or one per layer),
``initial_sparsity``, ``prune_start_epoch``, ``prune_end_epoch``, ``prune_temperature``,
``allow_regrowth`` and ``l1``. None: the method's default for the model.
GReg (``greg1``, ``greg2``) reads ``greg_granularity``, ``stage_pr``, ``greg_interval``,
``greg_delta``, ``greg_ceiling``, ``greg_ratio_limit``, ``greg_stabilise_steps``,
``greg_delta_pick``, ``greg_ceiling_pick``, ``greg_delta_recover``, ``pretrained`` (workdir of a
run whose weights to start from) and ``pretrain_epochs``; None: ``greg.DEFAULTS`` for the model.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
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
    config.augment = "none"
    config.normalize = False
    config.input_workers = 0
    config.input_threads = 4
    config.keep_checkpoints = 2

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
    config.lambdas = config_dict.placeholder(tuple)
    config.l2 = 5e-4  # (l2/2)||theta||^2 in the loss; stochastic: the L2 of the study
    config.droprate_init = config_dict.placeholder(float)
    config.per_example_gates = False

    config.temperature = 2.0 / 3.0
    config.clamp_log_alpha = True
    config.reference_bias_sign = False

    config.k = 7.0
    config.gate_fn = "sigmoid"
    config.test_rule = "binary"
    config.threshold = 0.5

    config.dependency = "forward"
    config.lamba = config_dict.placeholder(float)
    config.penalty_form = "layers"
    config.fine_tune_epochs = 0
    config.generator_input_width = config_dict.placeholder(int)

    # l1, bounded_lp: None takes the method's table (L1_DEFAULTS, BOUNDED_DEFAULTS) for the model.
    config.gate_lambda = config_dict.placeholder(object)  # one value or one per gate slot
    config.sigma = config_dict.placeholder(float)  # bounded_lp: L1-to-L0 transition scale
    config.p = 1.0  # bounded_lp exponent; 1: exact zeros by the prox
    config.filter_lambda = 0.0  # weight of the penalty on the gated groups' norms; 0: off
    config.filter_sigma = config_dict.placeholder(float)  # sigma of that penalty; None: sigma
    config.gate_threshold = 0.0  # bounded_lp with p > 1: gates at or below it are set to 0

    # stochastic: None takes stochastic.DEFAULTS for the model.
    config.final_sparsity = config_dict.placeholder(object)  # per-layer target, one or per layer
    config.initial_sparsity = 0.0  # target when the cubic ramp starts
    config.prune_start_epoch = 0.0  # the ramp's start (fractional epochs)
    config.prune_end_epoch = config_dict.placeholder(float)  # the ramp's end
    config.prune_temperature = config_dict.placeholder(float)  # T; None: DEFAULT_TEMPERATURE
    config.allow_regrowth = False  # False: pruned weights stay zero (persistent masks)
    config.l1 = config_dict.placeholder(float)  # L1 coefficient on the kernels (l2: above)

    config.greg_granularity = config_dict.placeholder(str)
    config.stage_pr = config_dict.placeholder(object)
    config.greg_interval = config_dict.placeholder(int)
    config.greg_delta = config_dict.placeholder(float)
    config.greg_ceiling = config_dict.placeholder(float)
    config.greg_ratio_limit = config_dict.placeholder(float)
    config.greg_stabilise_steps = config_dict.placeholder(int)
    config.greg_delta_pick = config_dict.placeholder(float)
    config.greg_ceiling_pick = config_dict.placeholder(float)
    config.greg_delta_recover = config_dict.placeholder(float)
    config.pretrained = config_dict.placeholder(str)
    config.pretrain_epochs = config_dict.placeholder(int)
    return config
