"""MNIST-family runs (LeNet-300-100, LeNet-5-Caffe) as in Louizos et al. (2018) and Li & Ji (2019).

    python -m experiments.mnist --method=l0_hc --model=lenet5 --dataset=fashion_mnist \
        --epochs=200 --workdir=runs/lenet5_l0_hc --config.lambdas="(10,0.5,0.1,10)"

Adam at 1e-3 for every parameter, batch 100, no schedule. ``lambdas`` are per gate slot in
units of 1/N (None: the paper's for the model: MLP (0.1, 0.1, 0.1), LeNet-5 (10, 0.5, 0.1, 10)).
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

    config.granularity = "unit"
    config.lambdas = config_dict.placeholder(tuple)
    config.l2 = 5e-4
    config.droprate_init = config_dict.placeholder(float)
    config.per_example_gates = False

    config.temperature = 2.0 / 3.0
    config.clamp_log_alpha = True
    config.reference_bias_sign = False

    config.k = 7.0
    config.gate_fn = "sigmoid"
    config.test_rule = "binary"
    config.threshold = 0.5
    return config
