"""Train a gated LeNet on (Fashion-)MNIST.

    python -m experiments.mnist --method=l0_arm --model=lenet5 --dataset=fashion_mnist \
        --epochs=10 --workdir=runs/lenet5_arm

Flags set the common fields; every other hyperparameter is a ``--config.NAME=VALUE`` override of
``experiments/configs/mnist.py`` (the gate learning rate of ``l1`` / ``bounded_lp``, when unset,
is ``recipes.MNIST_PROXIMAL_GATE_RATE``). Rerunning the same command with the same
``--workdir`` resumes.
SIGTERM or Ctrl-C saves a checkpoint and exits with status 75 (EX_TEMPFAIL: run it again).
"""

from sparsejax import host

host.configure()

from experiments import cli  # noqa: E402
from experiments.configs.recipes import resolve_mnist  # noqa: E402

if __name__ == "__main__":
    cli.run("mnist", resolve_mnist)
