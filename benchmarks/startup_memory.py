"""Peak memory and time to the first training step of the synthetic smoke runs.

    python -m benchmarks.startup_memory
    python -m benchmarks.startup_memory --runs=imagenet --limit_gb=10

Each run is one experiment CLI command on ``--dataset=synthetic`` started in a session of its
own. Every ``--interval`` seconds the benchmark finds the processes of that session (the CLI and
its input worker processes, which a dying parent would otherwise leave behind), sums their
resident memory and keeps the largest sum; each process's own peak (``VmHWM``) is a cross-check.
The time to the first training step is when the run's first training metrics record appears
(``--config.log_every=1``: one record per step). A run whose summed memory passes ``--limit_gb``
is killed, whole session, and reported as such. Linux only (reads ``/proc``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import app, flags

from sparsejax.train.metrics import METRICS_FILE

GIB = 1 << 30
_KIB = 1024

RUNS: dict[str, tuple[str, ...]] = {
    "mnist": ("experiments.mnist", "--method=l0_hc", "--model=lenet5", "--batch_size=100"),
    "cifar": ("experiments.cifar", "--method=l0_hc", "--model=resnet56", "--batch_size=32"),
    "imagenet": ("experiments.imagenet", "--method=l0_hc", "--model=resnet50", "--batch_size=4"),
}
"""The experiment module and flags of each smoke run (all on synthetic data, two steps)."""

SMOKE_FLAGS = ("--dataset=synthetic", "--epochs=1", "--steps_per_epoch=2", "--config.log_every=1")

_RUNS = flags.DEFINE_list("runs", list(RUNS), "Smoke runs to measure.")
_LIMIT = flags.DEFINE_float("limit_gb", 10.0, "Kill a run whose summed memory passes this (GiB).")
_INTERVAL = flags.DEFINE_float("interval", 0.05, "Seconds between memory samples.")
_TIMEOUT = flags.DEFINE_float("timeout", 900.0, "Seconds a run may take.")
_EXTRA = flags.DEFINE_list("extra", [], "More flags for every run, e.g. --config.input_workers=2.")


@dataclasses.dataclass(frozen=True)
class RunMemory:
    """What :func:`measure` saw of one command.

    Attributes:
      peak_bytes: the largest sum of resident memory over the command's processes at one sample.
      peak_hwm_bytes: the sum over every process seen of its own peak resident memory (VmHWM, as
        last read while it lived): an upper bound of ``peak_bytes``.
      max_processes: the most processes alive at one sample.
      ready_seconds: seconds from the start until ``ready()`` first held (None: never).
      seconds: seconds until the command exited (or was killed).
      returncode: the command's exit status (negative: killed by that signal).
      over_limit: whether it was killed for passing the memory limit.
      leftover_processes: processes of the command still alive ``grace`` seconds after it ended
        (then killed).
    """

    peak_bytes: int
    peak_hwm_bytes: int
    max_processes: int
    ready_seconds: float | None
    seconds: float
    returncode: int
    over_limit: bool
    leftover_processes: int


def session_processes(session: int) -> list[int]:
    """The ids of the live processes of ``session``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == session:
                    pids.append(int(entry))
            except OSError:
                continue
    return pids


def resident_bytes(pid: int) -> tuple[int, int]:
    """Current and peak resident memory (VmRSS, VmHWM) of a process; zeros once it is gone."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    fields[name] = int(value.split()[0]) * _KIB
    except OSError:
        pass
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def _kill(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue


def _outlive(session: int, grace: float, interval: float) -> list[int]:
    """The processes of ``session`` still alive ``grace`` seconds from now (or none sooner)."""
    deadline = time.perf_counter() + grace
    while (pids := session_processes(session)) and time.perf_counter() < deadline:
        time.sleep(interval)
    return pids


def measure(
    command: Sequence[str],
    *,
    limit_bytes: int,
    interval: float = 0.05,
    timeout: float = 900.0,
    grace: float = 10.0,
    ready: Callable[[], bool] = lambda: False,
    env: dict[str, str] | None = None,
    log: Path | None = None,
) -> RunMemory:
    """Runs ``command`` in a new session, sampling the summed resident memory of its processes.

    SIGKILLs the command when the sum passes ``limit_bytes`` or the time passes ``timeout``.
    Processes of the session alive ``grace`` seconds after the command ended are counted as left
    over and killed (the grace lets the command's children notice and clean up, e.g.
    multiprocessing's resource tracker). Output goes to ``log`` (or nowhere).
    """
    output = open(log, "w") if log else subprocess.DEVNULL
    started = time.perf_counter()
    process = subprocess.Popen(
        command, start_new_session=True, env=env, stdout=output, stderr=subprocess.STDOUT
    )
    session = process.pid
    peak, most, over_limit, ready_seconds = 0, 0, False, None
    hwm: dict[int, int] = {}
    try:
        while process.poll() is None:
            pids = session_processes(session)
            total = 0
            for pid in pids:
                rss, peak_rss = resident_bytes(pid)
                total += rss
                hwm[pid] = max(hwm.get(pid, 0), peak_rss)
            peak, most = max(peak, total), max(most, len(pids))
            if ready_seconds is None and ready():
                ready_seconds = time.perf_counter() - started
            if total > limit_bytes or time.perf_counter() - started > timeout:
                over_limit = total > limit_bytes
                break
            time.sleep(interval)
    finally:
        process.kill()
        process.wait()
        seconds = time.perf_counter() - started
        leftover = _outlive(session, grace, interval)
        _kill(leftover)
        if log:
            output.close()
    return RunMemory(
        peak_bytes=peak,
        peak_hwm_bytes=sum(hwm.values()),
        max_processes=most,
        ready_seconds=ready_seconds,
        seconds=seconds,
        returncode=process.returncode,
        over_limit=over_limit,
        leftover_processes=len(leftover),
    )


def has_training_record(workdir: Path) -> bool:
    """Whether the run in ``workdir`` has written a training metrics record."""
    path = workdir / METRICS_FILE
    if not path.exists():
        return False
    with path.open() as records:
        return any("train/loss" in json.loads(line) for line in records if line.endswith("\n"))


def measure_run(name: str, workdir: Path) -> RunMemory:
    """:func:`measure` of smoke run ``name`` writing into ``workdir``."""
    module, *run_flags = RUNS[name]
    command = [
        sys.executable, "-m", module, *run_flags, *SMOKE_FLAGS, *_EXTRA.value,
        f"--workdir={workdir / 'run'}",
    ]
    return measure(
        command,
        limit_bytes=int(_LIMIT.value * GIB),
        interval=_INTERVAL.value,
        timeout=_TIMEOUT.value,
        ready=lambda: has_training_record(workdir / "run"),
        log=workdir / "output.txt",
    )


def machine() -> str:
    """CPU model, core count and memory of this machine."""
    model = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB, Python {platform.python_version()}"


def _gib(count: int) -> str:
    return f"{count / GIB:.2f}"


def main(argv: list[str]) -> None:
    del argv
    rows = []
    for name in _RUNS.value:
        with tempfile.TemporaryDirectory() as workdir:
            result = measure_run(name, Path(workdir))
            if result.returncode:
                print(Path(workdir, "output.txt").read_text()[-3000:], file=sys.stderr)
        module, *run_flags = RUNS[name]
        first = "-" if result.ready_seconds is None else f"{result.ready_seconds:.1f}"
        status = "killed: over limit" if result.over_limit else f"exit {result.returncode}"
        rows.append(
            f"| {module} {' '.join(run_flags)} | {_gib(result.peak_bytes)} | "
            f"{_gib(result.peak_hwm_bytes)} | {result.max_processes} | {first} | "
            f"{result.seconds:.1f} | {status}, {result.leftover_processes} left over |"
        )
    print(f"machine: {machine()}; flags: {' '.join(SMOKE_FLAGS + tuple(_EXTRA.value))}")
    print("| run | peak GiB (summed RSS) | sum of VmHWM GiB | processes | first step s | "
          "total s | status |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    app.run(main)
