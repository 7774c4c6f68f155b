"""Input worker processes end with the process that started them, however it ends.

grain starts its worker processes as daemons, which Python ends when the parent exits normally;
a parent that is killed (SIGKILL, the kernel's out-of-memory killer) leaves them running, each
holding its memory. :func:`exit_with_parent` runs first in every worker (grain's
``worker_init_fn``): it ends the worker at once if the parent is already gone, then starts a
daemon thread that ends it within :data:`POLL_SECONDS` of the parent's death, noticed as a change
of the worker's parent process id (an orphan is adopted by init or a subreaper).

Linux's ``prctl(PR_SET_PDEATHSIG)`` is not used: it fires when the *thread* that started the
worker exits, and grain starts workers from its prefetch threads, which may end before the
parent does.
"""

from __future__ import annotations

import os
import signal
import threading
import time

POLL_SECONDS = 0.25
"""How often a worker checks that its parent is alive."""


def _end_worker() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _watch_parent(parent_pid: int, poll_seconds: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_seconds)
    _end_worker()


def exit_with_parent(
    parent_pid: int, worker_index: int = 0, worker_count: int = 1, *,
    poll_seconds: float = POLL_SECONDS,
) -> None:
    """Ends this process when process ``parent_pid`` (its parent) is gone.

    The signature is grain's ``worker_init_fn`` with the parent's id bound first:
    ``functools.partial(exit_with_parent, os.getpid())``; the worker index and count are unused.
    """
    del worker_index, worker_count
    if os.getppid() != parent_pid:
        _end_worker()
    threading.Thread(
        target=_watch_parent, args=(parent_pid, poll_seconds), daemon=True,
        name="exit-with-parent",
    ).start()
