"""Files written as their bytes arrive (a pull's download, a hub's upload), hashed and value-scanned in
the same pass, so that verification never reads them again.

`FileIntake` hands every chunk to worker threads, one per pass: one hashes it (hashlib releases the GIL
on large buffers), one writes it, and for the weights one runs the value scan (numpy's dot releases it
too), while the caller's thread goes back to receiving. What it establishes goes to `check_bundle` as
`Precomputed`, which then skips its own read of those files; every check still runs on these values.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from adapterhub_lite.bundles.tensors import header_length, parse_header
from adapterhub_lite.bundles.values import ValueReport, ValueScan
from adapterhub_lite.bundles.verify import Precomputed
from adapterhub_lite.errors import BundleError

_MAX_PENDING = 4  # chunks in flight per file: bounds memory at 4 chunks beyond the caller's


class FileIntake:
    """One file being written from a stream of chunks (bytes the caller will not modify again).

    `size` is the file's expected size (the value scan needs it to read the weights' header);
    `scan_values` runs the weights' value scan on the way; `durable` fsyncs the file at `finish`.
    """

    def __init__(
        self, path: Path, size: int, label: str, *, scan_values: bool = False, durable: bool = False
    ) -> None:
        self.path, self.expected, self.label, self.durable = Path(path), size, label, durable
        self.size = 0
        self._out = open(self.path, "wb", buffering=0)  # noqa: SIM115 - closed in finish/abort
        self._sha = hashlib.sha256()
        # One thread per pass over the bytes (hash, write, value scan): each keeps its own order, and
        # all three release the GIL for their large buffers.
        self._pools = [
            ThreadPoolExecutor(1, thread_name_prefix="intake") for _ in range(3 if scan_values else 2)
        ]
        self._pending: deque[list[Future]] = deque()
        self._head: bytearray | None = bytearray() if scan_values else None
        self._scan: ValueScan | None = None
        self._scanning = scan_values
        self.values_error: BundleError | None = None

    def write(self, chunk: bytes | memoryview) -> None:
        self.size += len(chunk)
        jobs = [self._pools[0].submit(self._sha.update, chunk), self._pools[1].submit(self._put, chunk)]
        if self._scanning:
            jobs.append(self._pools[2].submit(self._check, chunk))
        self._pending.append(jobs)
        while len(self._pending) > _MAX_PENDING:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        for f in self._pending.popleft():
            f.result()

    def _put(self, chunk: bytes | memoryview) -> None:
        view = memoryview(chunk)
        while view:
            view = view[self._out.write(view) :]

    def _check(self, chunk: bytes | memoryview) -> None:
        if self.values_error is None:
            try:
                self._feed(chunk)
            except BundleError as exc:
                self.values_error = exc

    def _feed(self, chunk: bytes | memoryview) -> None:
        if self._scan is not None:
            self._scan.update(chunk)
            return
        assert self._head is not None
        self._head += chunk
        if len(self._head) < 8:
            return
        n = header_length(bytes(self._head[:8]), self.expected, self.label)
        if len(self._head) < 8 + n:
            return
        tensors, _ = parse_header(bytes(self._head[: 8 + n]), self.expected, self.label)
        self._scan = ValueScan(tensors, 8 + n, self.label)
        head, self._head = bytes(self._head), None
        self._scan.update(head)

    def finish(self) -> tuple[str, ValueReport | BundleError | None]:
        """Wait for the workers; (sha256 hex, the value scan's report or refusal, None if not scanned)."""
        try:
            while self._pending:
                self._wait_oldest()
            if self.durable:
                os.fsync(self._out.fileno())
        finally:
            self._close()
        values: ValueReport | BundleError | None = None
        if self._scanning:
            if self.values_error is None and self._scan is None:
                self.values_error = BundleError(f"{self.label}: not a safetensors file (too short)")
            if self.values_error is None:
                try:
                    values = self._scan.finish()  # type: ignore[union-attr]
                except BundleError as exc:
                    values = exc
            else:
                values = self.values_error
        return self._sha.hexdigest(), values

    def abort(self) -> None:
        """Stop (after the chunks in flight) and close; the caller removes the file."""
        for jobs in self._pending:
            for f in jobs:
                f.cancel()
        self._close()

    def _close(self) -> None:
        for pool in self._pools:
            pool.shutdown(wait=True)
        self._out.close()


def precomputed(hashes: dict[str, str], weights_values: ValueReport | BundleError | None) -> Precomputed:
    """What `check_bundle` may take as established for these files (see `bundles.verify.Precomputed`)."""
    return Precomputed(sha256=dict(hashes), weights_values=weights_values)
