"""One run per working directory: a lock file that names its holder and proves it is alive.

The process that writes the run (process 0) creates ``workdir/run.lock`` with ``O_EXCL`` (atomic
on local and shared filesystems alike), writes its host, process id and the start time of that
process into it, and touches it every :data:`HEARTBEAT_SECONDS` from a daemon thread. A second
run finds the file and is refused, naming the holder, unless the holder is dead: on the same
host when its process id no longer names the process that wrote the lock, on another host when
the heartbeat is older than :data:`STALE_SECONDS`. A dead holder's lock is taken over with a
warning (renamed away first, so that of two runs taking over at once only one wins).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from sparsejax.errors import UserError, warn

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 4 * HEARTBEAT_SECONDS


class WorkdirLockedError(UserError):
    """Another live run holds the working directory."""


def process_start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from ``/proc``), which tells a
    process from a later one that reuses its id; None where ``/proc`` does not have it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive_here(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return started is None or process_start_time(pid) in (None, started)


def _holder_text(holder: dict) -> str:
    return f"process {holder.get('pid')} on host {holder.get('host')}"


class WorkdirLock:
    """Context manager holding ``workdir/run.lock`` while a run writes ``workdir``.

    Taking over a dead run's lock is said in a one-line warning."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / LOCK_FILE
        self._record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": process_start_time(os.getpid()),
        }
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _holder_is_dead(self, holder: dict) -> bool:
        if holder.get("host") == self._record["host"]:
            return not _alive_here(int(holder.get("pid", -1)), holder.get("started"))
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > STALE_SECONDS

    def _read_holder(self) -> tuple[dict, str]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}, ""
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        return (holder if isinstance(holder, dict) else {}), text

    def _take_over(self, text: str, holder: dict) -> None:
        """Move a dead holder's lock away, unless another run replaced it meanwhile."""
        moved = self.path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
        try:
            self.path.rename(moved)
        except FileNotFoundError:
            return
        if moved.read_text() != text:
            moved.rename(self.path)
            raise WorkdirLockedError(
                f"{self.path.parent} was just taken by another run; wait for it to finish or use "
                "another --workdir"
            )
        moved.unlink()
        what = _holder_text(holder) if holder else "an unreadable lock"
        warn(f"taking over {self.path} from {what}, which is no longer running")

    def _clear_dead_holder(self) -> None:
        holder, text = self._read_holder()
        if not holder:
            time.sleep(0.1)  # a run may be writing its lock right now
            holder, text = self._read_holder()
        if holder and not self._holder_is_dead(holder):
            raise WorkdirLockedError(
                f"{self.path.parent} is in use by {_holder_text(holder)} (see {self.path}); "
                "wait for that run to finish, stop it, or use another --workdir"
            )
        self._take_over(text, holder)

    def acquire(self) -> None:
        """Create the lock, or take over a dead holder's; raise :class:`WorkdirLockedError` when
        a live run holds it."""
        while True:
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._clear_dead_holder()
                continue
            try:
                with os.fdopen(descriptor, "w") as file:
                    file.write(json.dumps(self._record) + "\n")
            except OSError as error:  # e.g. a full disk: name the file, leave no empty lock
                self.path.unlink(missing_ok=True)
                raise OSError(error.errno, error.strerror, str(self.path)) from error
            break
        self._heartbeat = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this run's."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        holder, _ = self._read_holder()
        if holder == self._record:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
