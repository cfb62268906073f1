"""Ray's output into a log file, the command's own lines still on the terminal.

Ray writes from its C++ core (into file descriptor 2 of the driver), from its Python loggers, from a
thread that prints what its processes report (through `sys.stdout` and `sys.stderr`) and from the
processes it starts (which inherit descriptors 1 and 2): an auth banner at start, "graceful_shutdown
failed ... retries remaining" at every stop. None of it is for the user of `adapterhub cluster up`, all
of it is for whoever reads the log after a failure. So while Ray runs, descriptors 1 and 2 point at the
log, and the command writes its own lines through `terminal()`, a copy of the terminal's descriptor 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO


class OutputToLog:
    """Redirect descriptors 1 and 2 to `path` (replaced, 0600) between `start()` and `stop()`; `say()`
    writes a line to the terminal meanwhile."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._saved: list[int] = []
        self._terminal: TextIO | None = None

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def start(self) -> None:
        if self._saved:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # another user's file of that name is never written through
        log = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        self._saved = [os.dup(1), os.dup(2)]
        self._terminal = open(  # noqa: SIM115 - closed by stop()
            os.dup(self._saved[0]),
            "w",
            buffering=1,
            encoding=getattr(sys.stdout, "encoding", None) or "utf-8",
            errors="replace",
        )
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)

    def say(self, line: str) -> None:
        """One line on the terminal (into the log when not started)."""
        if self._terminal is None:
            print(line, flush=True)
            return
        self._terminal.write(line + "\n")
        self._terminal.flush()

    def stop(self) -> None:
        if not self._saved:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        if self._terminal is not None:
            self._terminal.close()
        for fd in self._saved:
            os.close(fd)
        self._saved, self._terminal = [], None
