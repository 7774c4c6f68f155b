import sys
import textwrap
from pathlib import Path

from benchmarks.startup_memory import GIB, has_training_record, measure

MIB = 1 << 20
ALLOCATE = "import time; block = b'x' * ({mib} << 20); time.sleep({seconds})"


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_measure_sums_the_memory_of_a_process_and_its_children():
    child = ALLOCATE.format(mib=200, seconds=1.5)
    parent = textwrap.dedent(f"""
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c", {child!r}])
        {ALLOCATE.format(mib=100, seconds=1.5)}
        child.wait()
    """)
    result = measure(python(parent), limit_bytes=4 * GIB, interval=0.02, grace=1.0)
    assert result.returncode == 0 and not result.over_limit
    assert result.max_processes == 2 and result.leftover_processes == 0
    assert 300 * MIB < result.peak_bytes < 400 * MIB  # two interpreters are ~10 MiB each
    assert result.peak_bytes <= result.peak_hwm_bytes < result.peak_bytes + 100 * MIB


def test_measure_kills_a_command_over_the_limit():
    result = measure(python(ALLOCATE.format(mib=300, seconds=60)), limit_bytes=100 * MIB)
    assert result.over_limit and result.returncode < 0 and result.seconds < 30


def test_measure_counts_and_kills_processes_left_behind():
    orphan = ALLOCATE.format(mib=1, seconds=60)
    parent = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {orphan!r}])"
    result = measure(python(parent), limit_bytes=GIB, grace=0.5)
    assert result.returncode == 0 and result.leftover_processes == 1


def test_measure_times_when_the_run_is_ready(tmp_path: Path):
    ready = tmp_path / "ready"
    code = (
        f"import pathlib, time; time.sleep(0.5); pathlib.Path({str(ready)!r}).touch(); "
        "time.sleep(0.5)"
    )
    result = measure(python(code), limit_bytes=GIB, ready=ready.exists)
    assert 0.4 < result.ready_seconds < result.seconds


def test_a_training_record_marks_the_first_step(tmp_path: Path):
    assert not has_training_record(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    assert has_training_record(tmp_path)
