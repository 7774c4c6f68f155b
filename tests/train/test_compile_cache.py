"""The persistent compilation cache is turned off only where a cached program hangs the run."""

import jax
import pytest

from experiments.configs.mnist import get_config
from sparsejax.train import compile_cache, loop


@pytest.fixture
def cache_settings(tmp_path):
    """A cache directory set and the cache enabled, as the user left them; restored after."""
    saved = jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cache"))
    jax.config.update("jax_enable_compilation_cache", True)
    yield tmp_path / "cache"
    jax.config.update("jax_compilation_cache_dir", saved[0])
    jax.config.update("jax_enable_compilation_cache", saved[1])


@pytest.mark.parametrize(
    "version, processes, backend, hangs",
    [
        ((0, 12, 1), 2, "cpu", True),
        ((0, 13), 4, "cpu", True),
        ((0, 11, 2), 2, "cpu", False),
        ((0, 10, 2), 2, "cpu", False),
        ((0, 12, 1), 1, "cpu", False),
        ((0, 12, 1), 2, "gpu", False),
        ((0, 12, 1), 2, "tpu", False),
    ],
)
def test_only_multi_process_cpu_runs_on_jax_0_12_or_later_hang(version, processes, backend, hangs):
    assert compile_cache.cache_would_hang(version, processes, backend) is hangs


def test_the_installed_version_is_read_as_numbers():
    version = compile_cache.jax_version()
    assert len(version) >= 2 and all(isinstance(part, int) for part in version)
    assert ".".join(map(str, version)) in jax.__version__


def test_a_hanging_run_turns_the_cache_off_and_says_so(cache_settings, monkeypatch, capsys):
    monkeypatch.setattr(compile_cache, "jax_version", lambda: (0, 12, 1))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert compile_cache.avoid_hanging_cache()
    assert not jax.config.jax_enable_compilation_cache
    warning = capsys.readouterr().err
    assert warning.startswith("warning: ") and warning.count("\n") == 1
    assert str(cache_settings) in warning and "several processes" in warning


@pytest.mark.parametrize("version, processes", [((0, 11, 2), 2), ((0, 12, 1), 1)])
def test_other_runs_keep_the_cache(cache_settings, monkeypatch, capsys, version, processes):
    monkeypatch.setattr(compile_cache, "jax_version", lambda: version)
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    assert not compile_cache.avoid_hanging_cache()
    assert jax.config.jax_enable_compilation_cache
    assert capsys.readouterr().err == ""


def test_without_a_cache_directory_nothing_changes(cache_settings, monkeypatch, capsys):
    jax.config.update("jax_compilation_cache_dir", None)
    monkeypatch.setattr(compile_cache, "jax_version", lambda: (0, 12, 1))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert not compile_cache.avoid_hanging_cache()
    assert jax.config.jax_enable_compilation_cache
    assert capsys.readouterr().err == ""


def test_a_run_decides_on_the_cache_before_it_compiles_or_writes(monkeypatch, tmp_path):
    class Decided(Exception):
        pass

    def decide():
        raise Decided

    monkeypatch.setattr(loop, "avoid_hanging_cache", decide)
    config = get_config("l0_hc")
    config.update(dataset="synthetic", model="mlp", epochs=1, num_train=64, num_test=64)
    with pytest.raises(Decided):
        loop.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()
