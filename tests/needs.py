"""What a test needs from the machine: a skip that names it outside CI, a failure under `CI=1`.

In CI (`.ci/run` sets `CI=1`) everything the suite needs is installed, so a missing piece is a broken
image, never a reason to pass quietly.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def missing(what: str) -> None:
    """Stop the calling test: fail under CI, else skip, naming what is missing and how to get it."""
    if in_ci():
        pytest.fail(f"CI=1 and {what}", pytrace=False)
    pytest.skip(what)


def require_module(name: str, how: str) -> ModuleType:
    """`import name`, or `missing(...)` naming the module and `how` to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"{name} cannot be imported ({exc}); {how}")
        raise  # unreachable: missing() raises
