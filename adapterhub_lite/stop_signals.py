"""SIGINT and SIGTERM for a command that runs a server in the foreground until told to stop."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While starting, either signal raises KeyboardInterrupt (so a start can be abandoned and what
    already started stopped); after `started()`, either one sets `stop`. Both handlers are set explicitly:
    a background job of a non-interactive shell starts with SIGINT ignored. The previous handlers come
    back on exit."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        self._previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
        for sig in _SIGNALS:
            signal.signal(sig, _interrupt)
        return self

    def started(self) -> None:
        """From now on a signal asks for a stop (`self.stop`) instead of interrupting."""
        for sig in _SIGNALS:
            signal.signal(sig, lambda *_: self.stop.set())

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def _interrupt(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt
