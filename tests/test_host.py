import subprocess
import sys

from sparsejax import host


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return 1


def test_applies_every_setting_in_order():
    libc = FakeLibc()
    applied = host.configure({}, libc)
    assert libc.calls == [(p, v) for _, p, v in host.MALLOC_SETTINGS]
    assert applied == {name: v for name, _, v in host.MALLOC_SETTINGS}


def test_a_users_environment_variable_wins():
    libc = FakeLibc()
    applied = host.configure({"MALLOC_TRIM_THRESHOLD_": "4096"}, libc)
    assert "MALLOC_TRIM_THRESHOLD_" not in applied
    assert all(parameter != host.M_TRIM_THRESHOLD for parameter, _ in libc.calls)
    assert len(libc.calls) == len(host.MALLOC_SETTINGS) - 1


def test_opt_out_and_tunables_leave_malloc_alone():
    for environ in ({host.OPT_OUT_VARIABLE: host.OPT_OUT_VALUE}, {"GLIBC_TUNABLES": "x"}):
        libc = FakeLibc()
        assert host.configure(environ, libc) == {}
        assert libc.calls == []


REUSE_SCRIPT = """
import ctypes, resource, sys
from sparsejax import host
if sys.argv[1] == "on":
    assert host.configure()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
libc.free.argtypes = (ctypes.c_void_p,)
size = 48 << 20

def step():
    buffer = libc.malloc(size)
    libc.memset(buffer, 1, size)
    libc.free(buffer)

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def test_a_large_freed_buffer_is_reused_without_page_faults():
    """A 48 MB buffer (above glibc's largest dynamic mmap threshold, 32 MB) allocated, written
    and freed like a step's scratch memory."""
    if host._glibc() is None:
        return
    faults = {
        mode: int(subprocess.run([sys.executable, "-c", REUSE_SCRIPT, mode], check=True,
                                 capture_output=True, text=True).stdout)
        for mode in ("off", "on")
    }
    assert faults["on"] < 0.1 * faults["off"], faults
