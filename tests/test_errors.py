"""Which errors the command lines report as one line, and how."""

import errno
import logging
import sys

import pytest

from sparsejax.data import DatasetNotFoundError
from sparsejax.errors import (
    DEBUG_ENVIRONMENT_VARIABLE,
    EXIT_FAILED,
    ConfigError,
    DuplicateTracebackFilter,
    error_message,
    report_error,
    reported_errors,
    written_under,
)

TENSORSTORE_ENOSPC = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database at local file "/runs/a/ocdbt/": '
    'Failed writing: "/runs/a/ocdbt/d/12ab": Failed to write 1102131 bytes to file 21: No space '
    "left on device [os_error_code='28']"
)


def test_a_user_error_is_its_message_on_one_line():
    assert error_message(ConfigError("bad value:\n  details"), "--workdir") == "bad value: details"


def test_a_dataset_not_found_error_keeps_its_list_of_places():
    message = "Dataset 'mnist' not found. Searched:\n  - /a\n  - /b\n"
    assert error_message(DatasetNotFoundError(message), "--workdir") == message.rstrip()


@pytest.mark.parametrize(
    "number, meaning, advice",
    [
        (errno.ENOSPC, "no space left on device (ENOSPC)", "free space"),
        (errno.EROFS, "read-only file system (EROFS)", "writable"),
        (errno.EACCES, "permission denied (EACCES)", "permissions"),
        (errno.EDQUOT, "disk quota exceeded (EDQUOT)", "quota"),
    ],
)
def test_an_environment_error_names_the_path_its_meaning_and_the_fix(number, meaning, advice):
    message = error_message(OSError(number, "ignored", "/runs/a/config.json"), "--workdir")
    assert message.startswith(f"/runs/a/config.json: {meaning}")
    assert advice in message and "another --workdir" in message


def test_tensorstores_os_errors_are_environment_errors():
    message = error_message(TENSORSTORE_ENOSPC, "--workdir")
    assert message.startswith("/runs/a/ocdbt/d/12ab: no space left on device (ENOSPC); ")


def test_an_environment_error_without_a_file_is_named_by_the_directory_written_under():
    with pytest.raises(OSError) as raised, written_under("/runs/a/checkpoints"):
        raise OSError(errno.ENOSPC, "No space left on device")
    message = error_message(raised.value, "--workdir")
    assert message.startswith("/runs/a/checkpoints: no space left on device (ENOSPC); ")


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "full", "/runs/a/x"),
        TENSORSTORE_ENOSPC,
        ValueError("a bug"),
        KeyError("k"),
    ],
)
def test_written_under_leaves_an_error_that_names_its_file_or_is_a_bug_as_it_is(error):
    with pytest.raises(type(error)) as raised, written_under("/runs/a/checkpoints"):
        raise error
    assert raised.value is error


@pytest.mark.parametrize(
    "error", [ValueError("a bug"), FileNotFoundError(errno.ENOENT, "gone", "/x"), KeyError("k")]
)
def test_other_errors_are_bugs(error):
    assert error_message(error, "--workdir") is None
    with pytest.raises(type(error)):
        report_error(error, debug=False, output="--workdir")


def test_report_error_prints_one_line_and_returns_the_exit_status(capsys):
    assert report_error(ConfigError("wrong"), debug=False, output="--out") == EXIT_FAILED
    assert capsys.readouterr().err == "error: wrong\n"


def test_debug_raises_the_error_again(monkeypatch):
    with pytest.raises(ConfigError):
        report_error(ConfigError("wrong"), debug=True, output="--out")
    monkeypatch.setenv(DEBUG_ENVIRONMENT_VARIABLE, "1")
    with pytest.raises(ConfigError):
        report_error(ConfigError("wrong"), debug=False, output="--out")


def test_reported_errors_exits_and_lets_bugs_through(capsys):
    with pytest.raises(SystemExit) as stopped, reported_errors(debug=False, output="--workdir"):
        raise OSError(errno.ENOSPC, "full", "/runs/a")
    assert stopped.value.code == EXIT_FAILED
    assert capsys.readouterr().err.startswith("error: /runs/a: no space left on device")
    with pytest.raises(ZeroDivisionError), reported_errors(debug=False, output="--workdir"):
        raise ZeroDivisionError


def log_record(error: BaseException | None) -> logging.LogRecord:
    exc_info = (type(error), error, None) if error is not None else None
    return logging.LogRecord("absl", logging.ERROR, __file__, 1, "worker failed", (), exc_info)


def test_the_filter_drops_only_tracebacks_of_reported_errors():
    keep = DuplicateTracebackFilter().filter
    assert not keep(log_record(TENSORSTORE_ENOSPC))
    assert keep(log_record(ValueError("a bug"))) and keep(log_record(None))
    assert sys.exc_info() == (None, None, None)
