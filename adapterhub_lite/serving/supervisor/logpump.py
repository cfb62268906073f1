"""vLLM's output, copied into a size-bounded log file while the startup phases are timed from it.

A server that runs for weeks logs every adapter load; one growing file in $TMPDIR is how temp space
filled up. The log keeps at most `max_bytes` in the file and as much again in `<file>.1`.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import IO

from adapterhub_lite.vllm_compat.launch import STARTUP_MARKERS

DEFAULT_LOG_MAX_BYTES = 16 * 1024 * 1024


class LogPump:
    """Reads a child's combined stdout/stderr in a thread, writes it to `path` (rotated once at
    `max_bytes`) and records when each startup marker line first appears (monotonic seconds)."""

    def __init__(
        self,
        stream: IO[bytes],
        path: Path,
        max_bytes: int = DEFAULT_LOG_MAX_BYTES,
        tee: IO[bytes] | None = None,
    ) -> None:
        self.stream = stream
        self.tee = tee  # also copy every line here (`--verbose`)
        self.path = path
        self.max_bytes = max_bytes
        self.marks: dict[str, float] = {}
        self._pending = list(STARTUP_MARKERS)
        self._thread = threading.Thread(target=self._run, name="vllm-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        out = open(self.path, "wb")  # noqa: SIM115 - rotated below
        written = 0
        try:
            for line in iter(self.stream.readline, b""):
                if self._pending:
                    self._mark(line.decode(errors="replace"))
                if written + len(line) > self.max_bytes:
                    out.close()
                    self.path.replace(self.path.with_name(self.path.name + ".1"))
                    out = open(self.path, "wb")  # noqa: SIM115
                    written = 0
                out.write(line)
                out.flush()
                if self.tee is not None:
                    self.tee.write(line)
                    self.tee.flush()
                written += len(line)
        finally:
            out.close()

    def _mark(self, line: str) -> None:
        now = time.monotonic()
        for name, pattern in list(self._pending):
            if pattern.search(line):
                # a later marker implies the earlier ones (a phase whose line vLLM did not print)
                for earlier, _ in self._pending[: self._pending.index((name, pattern)) + 1]:
                    self.marks.setdefault(earlier, now)
                self._pending = self._pending[self._pending.index((name, pattern)) + 1 :]
                return

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        """What the log holds now (the rotated part first)."""
        parts = []
        for p in (self.path.with_name(self.path.name + ".1"), self.path):
            try:
                parts.append(p.read_text(errors="replace"))
            except OSError:
                continue
        return "".join(parts)
