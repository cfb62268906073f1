"""Ray's output into a log file, the command's own lines still on the terminal.

Ray writes from its C++ core (into file descriptor 2 of the driver), from its Python loggers and from
the processes it starts (which inherit descriptors 1 and 2): an auth banner at start, "graceful_shutdown
failed ... retries remaining" at every stop. None of it is for the user of `adapterhub cluster up`, all
of it is for whoever reads the log after a failure. So while Ray runs, descriptors 1 and 2 point at the
log, and Python's `sys.stdout` / `sys.stderr` at copies of the terminal's descriptors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO


class OutputToLog:
    """Redirect descriptors 1 and 2 to `path` (replaced, 0600) between `start()` and `stop()`.

    Import whatever logs to `sys.stderr` through a handler (Ray) before `start()`: a handler made
    afterwards would write to the terminal copy.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: list[int] = []
        self._streams: tuple[TextIO, TextIO] | None = None

    def start(self) -> None:
        if self._saved:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # another user's file of that name is never written through
        log = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._saved = [os.dup(1), os.dup(2)]
        self._streams = (sys.stdout, sys.stderr)
        sys.stdout = _terminal(self._saved[0], sys.stdout)
        sys.stderr = _terminal(self._saved[1], sys.stderr)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)

    def stop(self) -> None:
        if not self._saved or self._streams is None:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        ours = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = self._streams
        for stream in ours:
            stream.close()
        for fd in self._saved:
            os.close(fd)
        self._saved, self._streams = [], None


def _terminal(fd: int, like: TextIO) -> TextIO:
    return open(  # noqa: SIM115 - closed by stop()
        os.dup(fd),
        "w",
        buffering=1,
        encoding=getattr(like, "encoding", None) or "utf-8",
        errors=getattr(like, "errors", None) or "replace",
    )
