"""Progress display: a tqdm bar on a terminal, plain lines on stderr otherwise."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """Counts training steps; ``update`` takes the steps done and a short status text."""

    def __init__(self, total_steps: int, initial: int = 0):
        self._bar = (
            tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)
            if sys.stderr.isatty()
            else None
        )
        self._total = total_steps
        self._done = initial

    @property
    def total(self) -> int:
        """The steps the run is planned to take."""
        return self._total

    def set_total(self, total_steps: int) -> None:
        """Change the planned steps (a phase that ended before its longest length)."""
        self._total = total_steps
        if self._bar is not None and self._bar.total != total_steps:
            self._bar.total = total_steps
            self._bar.refresh()

    def update(self, steps: int, status: str) -> None:
        self._done += steps
        if self._bar is not None:
            self._bar.update(steps)
            self._bar.set_postfix_str(status)
        else:
            _line(f"step {self._done}/{self._total} {status}")

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        else:
            _line(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _line(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)
