"""Train a gated LeNet on (Fashion-)MNIST.

    python -m experiments.mnist --method=l0_arm --model=lenet5 --dataset=fashion_mnist \
        --epochs=10 --workdir=runs/lenet5_arm

Flags set the common fields; every other hyperparameter is a ``--config.NAME=VALUE`` override of
``experiments/configs/mnist.py``. Rerunning the same command with the same ``--workdir`` resumes.
SIGTERM or Ctrl-C saves a checkpoint and exits with status 75 (EX_TEMPFAIL: run it again).
"""

from experiments import cli

if __name__ == "__main__":
    cli.run("mnist")
