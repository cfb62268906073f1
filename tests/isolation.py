"""No test sees another's environment (a pytest plugin, loaded by conftest.py).

Every test starts with no library `ADAPTERHUB_*` variable set (but one: the compile cache all the
suite's vLLM servers share) and its own empty `HOME`, so nothing reads or writes the real
`~/.adapterhub` and a variable one test sets cannot change the next one's behaviour; torch's thread
count is put back and usage-ledger writers are closed after each test. Session fixtures are built
before this runs (pytest sets up wider scopes first), with the environment the suite was started in.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

# Knobs of the test suite itself (which base to serve, where PostgreSQL lives), not library settings.
SUITE_VARIABLES = ("ADAPTERHUB_TEST_", "ADAPTERHUB_PG_BIN")
_REAL_CACHE = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
_COMPILE_CACHE = os.path.join(_REAL_CACHE, "adapterhub-tests", "compile")


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path_factory, monkeypatch) -> Iterator[None]:
    """Every test starts with no library `ADAPTERHUB_*` variable set and its own empty `HOME`; torch's
    thread count is put back afterwards. Caches of compiled kernels and tokenizers stay where they were
    (`XDG_CACHE_HOME`): they are not state a test can leak, and rebuilding them costs minutes."""
    for name in [n for n in os.environ if n.startswith("ADAPTERHUB_") and not n.startswith(SUITE_VARIABLES)]:
        monkeypatch.delenv(name)
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):  # these would lead out of HOME
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", _REAL_CACHE)
    # What torch compiles for vLLM is shared by the suite's servers like the caches above: each server
    # compiling its own would cost every start its warm-up compile (test_serving_cli checks the default).
    monkeypatch.setenv("ADAPTERHUB_COMPILE_CACHE_DIR", _COMPILE_CACHE)
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    yield
    ledger = sys.modules.get("adapterhub_lite.serving.gateway.ledger")
    if ledger is not None:  # a usage-ledger writer a test started must not outlive it (or its database)
        ledger.close_all(timeout=10)
    torch = sys.modules.get("torch")
    if torch is not None and threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
