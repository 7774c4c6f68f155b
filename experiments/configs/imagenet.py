"""ImageNet (ILSVRC 2012) runs: ResNet-34, ResNet-50 and MobileNetV2.

    python -m experiments.imagenet --method=dep_l0 --model=resnet50 --data_dir=~/tensorflow_datasets

ImageNet is read with ``tfds.data_source`` from ArrayRecord files (prepare them once with
``tfds build imagenet2012 --file_format=array_record``), decoded and augmented in grain worker
processes (random resized crop 224 + flip; evaluation: resize 256, center crop 224). The
validation split is the test set. Schedule fields left None take the paper's values
(:mod:`experiments.configs.recipes`), the evaluation batch size the training batch size (so that
evaluating needs no more memory than training); ``--dataset=synthetic`` makes 224x224 random data.
At most one input worker runs per CPU core.
"""

import ml_collections
from ml_collections import config_dict

from experiments.configs import cifar


def get_config(method: str | None = None) -> ml_collections.ConfigDict:
    """The shared fields for ImageNet runs and the fields of ``method`` (None: dep_l0)."""
    config = cifar.get_config(method)
    config.model = "resnet50"
    config.dataset = "imagenet2012"
    config.synthetic_like = "imagenet2012"
    config.augment = "none"
    config.normalize = False
    config.eval_batch_size = config_dict.placeholder(int)
    config.input_workers = 16
    config.input_threads = 2
    config.log_every = 500
    return config
