"""Named points in a publish where tests stop a real process (SIGKILL) to prove crash safety.

Nothing in production sets the hook; `fault_point` is then a no-op.
"""

from __future__ import annotations

from collections.abc import Callable

hook: Callable[[str], None] | None = None


def fault_point(step: str) -> None:
    """Called at each named step of a write; runs the test's `hook` if one is set."""
    if hook is not None:
        hook(step)
