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
    applied = host.configure({"MALLOC_ARENA_MAX": "4"}, libc)
    assert "MALLOC_ARENA_MAX" not in applied
    assert (host.M_ARENA_MAX, 1) not in libc.calls
    assert len(libc.calls) == len(host.MALLOC_SETTINGS) - 1


def test_opt_out_and_tunables_leave_malloc_alone():
    for environ in ({host.OPT_OUT_VARIABLE: host.OPT_OUT_VALUE}, {"GLIBC_TUNABLES": "x"}):
        libc = FakeLibc()
        assert host.configure(environ, libc) == {}
        assert libc.calls == []


STEPS_SCRIPT = """
import resource, sys
from sparsejax import host
if sys.argv[1] == "on":
    assert host.configure()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.sin(x) * jnp.cos(x)[::-1]))
x = jnp.ones((8 << 20,))
for _ in range(20):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    f(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def test_scratch_memory_is_reused_without_page_faults():
    if host._glibc() is None:
        return
    faults = {
        mode: int(subprocess.run([sys.executable, "-c", STEPS_SCRIPT, mode], check=True,
                                 capture_output=True, text=True).stdout)
        for mode in ("off", "on")
    }
    assert faults["on"] < 0.1 * faults["off"], faults
