"""A failure inside a thread fails the test that started it (a pytest plugin, loaded by conftest.py).

pytest alone turns an exception that ends a thread into a warning, so a worker's `assert` under load
could fail and its test still pass. Here `threading.excepthook` is replaced around each test's setup,
call and teardown; what it catches is raised in the test's own thread as that phase's failure, with
the thread's name and traceback. A thread that dies after its test ended reaches pytest's own hook,
whose warning pyproject's `filterwarnings` turns into an error. `tests/test_suite_rules.py` proves both.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterator

import pytest


class ThreadFailure(AssertionError):
    """Raised in the test's own thread for exceptions that ended one of its worker threads."""


def _run_catching_thread_failures(phase: str) -> Iterator[None]:
    caught: list[threading.ExceptHookArgs] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        caught.append(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
    if caught:
        parts = []
        for args in caught:
            name = args.thread.name if args.thread is not None else "a thread"
            tb = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
            parts.append(f"exception in {name} during {phase}:\n{tb}")
        raise ThreadFailure(f"{len(caught)} thread(s) failed\n" + "\n".join(parts))


def _guarded(phase: str):
    """The body of each phase's wrapper: the phase runs with thread failures caught and raised after."""
    gen = _run_catching_thread_failures(phase)
    next(gen)
    try:
        return (yield)
    finally:
        next(gen, None)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    return (yield from _guarded("setup"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item):
    return (yield from _guarded("call"))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item, nextitem):
    return (yield from _guarded("teardown"))
