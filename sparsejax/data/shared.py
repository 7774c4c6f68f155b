"""NumPy arrays in shared memory that pickle by name, so worker processes attach to one copy.

Input worker processes are started with ``spawn`` and receive their dataset pickled; an in-memory
dataset would be copied into every one of them. :class:`SharedArrays` copies arrays once into
POSIX shared memory blocks (``multiprocessing.shared_memory``); pickled, it holds only the blocks'
names, shapes and dtypes, and unpickled it maps the same memory read-only.

Lifetime: a block's name is unlinked by the process that made it when its :class:`SharedArrays`
is garbage collected or the interpreter exits (if that process is killed, by multiprocessing's
resource tracker once every process using it has ended); its memory is unmapped in each process
when the last array viewing it is.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from multiprocessing import shared_memory

import numpy as np


class _Block(shared_memory.SharedMemory):
    """A shared memory block whose mapping lives as long as the arrays viewing it: unlike
    ``SharedMemory`` it does not close the mapping when it is garbage collected (which fails
    while NumPy views of it exist)."""

    def __del__(self) -> None:
        pass


def _unlink(blocks: list[_Block]) -> None:
    for block in blocks:
        block.unlink()


class SharedArrays:
    """Named arrays held in shared memory; :attr:`arrays` are read-only NumPy views of them."""

    def __init__(self, arrays: Mapping[str, np.ndarray]):
        self._specs = {name: (a.shape, a.dtype.str) for name, a in arrays.items()}
        self._blocks = {
            name: _Block(create=True, size=max(a.nbytes, 1))
            for name, a in arrays.items()
        }
        for name, array in arrays.items():
            self._view(name, writeable=True)[...] = array
        self.arrays = {name: self._view(name) for name in self._specs}
        weakref.finalize(self, _unlink, list(self._blocks.values()))

    def _view(self, name: str, writeable: bool = False) -> np.ndarray:
        shape, dtype = self._specs[name]
        view = np.ndarray(shape, dtype, buffer=self._blocks[name].buf)
        view.flags.writeable = writeable
        return view

    def __getstate__(self) -> dict:
        return {"specs": self._specs, "names": {k: b.name for k, b in self._blocks.items()}}

    def __setstate__(self, state: dict) -> None:
        self._specs = state["specs"]
        self._blocks = {key: _Block(name=name) for key, name in state["names"].items()}
        self.arrays = {name: self._view(name) for name in self._specs}
