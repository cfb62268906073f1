"""The suite's own rules, checked by running pytest on small test files in a subprocess.

- a failure inside a worker thread fails its test (plugin `thread_failures`, and pyproject's
  `filterwarnings` for a thread that outlives its test);
- no test sees another test's `ADAPTERHUB_*` variables or `HOME` (plugin `isolation`);
- what the suite needs is found wherever it is installed, and under `CI=1` a missing piece fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent
ROOT = TESTS.parent

THREAD_FAILS = """
import threading

def test_worker_fails():
    t = threading.Thread(target=lambda: exec("assert False, 'the worker saw a wrong answer'"))
    t.start()
    t.join()
"""

THREAD_OUTLIVES_TEST = """
import threading, time

started = threading.Event()

def late():
    started.set()
    time.sleep(0.3)
    raise RuntimeError("failed after its test returned")

def test_starts_a_thread():
    threading.Thread(target=late, name="late-worker").start()
    started.wait(10)

def test_next():  # the late thread fails while this one runs: waited for, not slept through
    for t in threading.enumerate():
        if t.name == "late-worker":
            t.join(30)
"""

THREAD_PASSES = """
import threading

def test_worker_succeeds():
    seen = []
    t = threading.Thread(target=lambda: seen.append(1))
    t.start()
    t.join()
    assert seen == [1]
"""


def _pytest(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    """Run pytest on one file in a folder of its own (no conftest, no pyproject: only what `args` load)."""
    (tmp_path / "test_case.py").write_text(source)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         "-c", os.devnull, str(tmp_path / "test_case.py"), *args],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )


def test_plain_pytest_lets_a_failing_thread_pass(tmp_path):
    """The control: without the plugin, pytest only warns, so the rule below is not a tautology."""
    r = _pytest(tmp_path, THREAD_FAILS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout and "PytestUnhandledThreadExceptionWarning" in r.stdout


def test_a_failing_thread_fails_its_test(tmp_path):
    r = _pytest(tmp_path, THREAD_FAILS, "-p", "thread_failures")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed" in r.stdout and "FAILED test_case.py::test_worker_fails" in r.stdout
    assert "the worker saw a wrong answer" in r.stdout  # the thread's own traceback is shown


def test_a_passing_thread_passes(tmp_path):
    r = _pytest(tmp_path, THREAD_PASSES, "-p", "thread_failures")
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr


def test_a_thread_failing_after_its_test_is_an_error(tmp_path):
    """A thread still running when its test returns is reported by pytest's own hook; the suite's
    `filterwarnings` (read here from pyproject.toml) turns that warning into a failure."""
    import tomllib

    filters = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"][
        "filterwarnings"
    ]
    assert "error::pytest.PytestUnhandledThreadExceptionWarning" in filters
    r = _pytest(tmp_path, THREAD_OUTLIVES_TEST, "-W", "error::pytest.PytestUnhandledThreadExceptionWarning")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed after its test returned" in r.stdout


ENV_LEAK = """
import os
from pathlib import Path

def test_a_sets():
    os.environ["ADAPTERHUB_REGISTRY"] = "/leaked"
    (Path.home() / ".adapterhub").mkdir()

def test_b_sees_nothing():
    assert "ADAPTERHUB_REGISTRY" not in os.environ
    assert "ADAPTERHUB_SOMETHING" not in os.environ
    assert os.environ["ADAPTERHUB_TEST_BASE"] == "/kept"  # the suite's own knobs stay
    assert not (Path.home() / ".adapterhub").exists()
"""


def test_environment_and_home_do_not_leak_between_tests(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_SOMETHING", "outer")
    monkeypatch.setenv("ADAPTERHUB_TEST_BASE", "/kept")
    r = _pytest(tmp_path, ENV_LEAK, "-p", "isolation")
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout + r.stderr
    control = _pytest(tmp_path, ENV_LEAK)  # without the plugin the first test's changes reach the second
    assert control.returncode == 1 and "1 failed" in control.stdout, control.stdout + control.stderr


def test_postgresql_of_any_major_version_is_found(tmp_path, monkeypatch):
    """Not only Debian's PostgreSQL 15: the newest `/usr/lib/postgresql/<major>/bin` with both tools."""
    from pg_server import find_pg_bin

    for major, tools in (("15", ["initdb", "pg_ctl"]), ("17", ["initdb", "pg_ctl"]), ("18", ["initdb"])):
        (tmp_path / major / "bin").mkdir(parents=True)
        for tool in tools:
            (tmp_path / major / "bin" / tool).write_text("")
    monkeypatch.delenv("ADAPTERHUB_PG_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no pg_config, no initdb on PATH
    assert find_pg_bin(tmp_path) == tmp_path / "17" / "bin"  # 18 lacks pg_ctl
    assert find_pg_bin(tmp_path / "absent") is None


def test_a_missing_piece_skips_with_its_name_outside_ci_and_fails_in_ci(monkeypatch):
    import pytest
    from needs import missing, require_module

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_module cannot be imported.*pip install it"):
        require_module("no_such_module", "pip install it")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CI=1 and redis-server is missing"):
        missing("redis-server is missing")
