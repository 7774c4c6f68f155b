"""GReg-1 and GReg-2, pruning by growing L2 regularisation (Wang, Qin, Zhang, Fu, ICLR 2021).

:mod:`.method` is the method (phases, loss, after-update), :mod:`.schedule` the growing-penalty
schedule as array arithmetic, :mod:`.rules` which layers are pruned at which ratio,
:mod:`.report` what a run has done so far, and :mod:`.accounting` GReg's own weight and FLOP
counter (the reference's, so speedups compare with the paper's).
"""

from sparsejax.methods.greg.method import FIELDS, GReg, GReg1, GReg2
from sparsejax.methods.greg.report import greg_progress, kept_channels, pruned_size

__all__ = [
    "FIELDS",
    "GReg",
    "GReg1",
    "GReg2",
    "greg_progress",
    "kept_channels",
    "pruned_size",
]
