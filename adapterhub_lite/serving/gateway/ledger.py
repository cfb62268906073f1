"""The usage ledger's writer: every answered inference request becomes one row, written in batches off the
request path (the rows and their queries: usage_store.py).

A request only appends to a bounded in-memory queue (`put_nowait`: never waits). A background thread
wakes every `ADAPTERHUB_USAGE_FLUSH_SECONDS` (default 1) and writes what is queued, up to `BATCH_MAX` rows
per transaction. When the queue is full (`ADAPTERHUB_USAGE_QUEUE` rows, default 10000: the database is
down or far slower than the traffic) new rows are dropped, counted on `/metrics` as
`adapterhub_usage_dropped_total` and logged, and the request goes on. While the database cannot be
reached the writer keeps its batch and retries; the `event_id` of each row makes a retry after a lost
commit harmless.

Durability: a clean stop (SIGTERM/SIGINT: the server's lifespan shutdown, or interpreter exit) writes
everything queued before the process ends. A crash (SIGKILL, power loss) loses what was queued and not
yet written: at most the last flush window of requests (plus whatever piled up during a database outage).
`ADAPTERHUB_USAGE_LEDGER=0` turns the ledger off.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, MutableMapping
from typing import Any

from adapterhub_lite.errors import AdapterHubError
from adapterhub_lite.settings import Settings, env_name, settings
from adapterhub_lite.tenants.usage_store import UsageEvent, UsageStore

logger = logging.getLogger("adapterhub.serving")

ENV_LEDGER = env_name("usage_ledger")
ENV_FLUSH_SECONDS = env_name("usage_flush_seconds")
ENV_QUEUE = env_name("usage_queue")
DEFAULT_FLUSH_SECONDS: float = Settings.model_fields["usage_flush_seconds"].default
DEFAULT_QUEUE: int = Settings.model_fields["usage_queue"].default
BATCH_MAX = 1000  # rows per transaction
ROLLUP_EVERY_S = 3600.0
STOP_RETRIES = 3  # at a stop, tries per batch before it is given up (and counted as dropped)
_SCOPE_KEY = "adapterhub.usage"
_LOG_EVERY_S = 10.0

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Any]


class _Entry:
    """One request in flight: what the ledger learns about it on the way."""

    __slots__ = ("start", "tenant", "alias", "ref", "status", "forwarded", "done")

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.tenant = ""
        self.alias = ""
        self.ref = ""
        self.status = 0
        self.forwarded = False
        self.done = False


class _Counters:
    """Prometheus counters of the writer, on the default registry (one set per process)."""

    _instance: _Counters | None = None

    def __init__(self) -> None:
        from prometheus_client import Counter

        self.written = Counter("adapterhub_usage_written", "Usage ledger rows written to the database.")
        self.dropped = Counter(
            "adapterhub_usage_dropped", "Usage ledger rows dropped (queue full, or unwritable at a stop)."
        )

    @classmethod
    def get(cls) -> _Counters:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance


def enabled_by_env() -> bool:
    return settings().usage_ledger


class UsageLedger:
    """The bounded queue and its writer thread (started on the first row, in the process that serves)."""

    def __init__(
        self,
        store: UsageStore,
        *,
        flush_seconds: float = DEFAULT_FLUSH_SECONDS,
        queue_max: int = DEFAULT_QUEUE,
    ) -> None:
        self.store = store
        self.flush_seconds = flush_seconds
        self.queue_max = queue_max
        self._queue: queue.Queue[UsageEvent] = queue.Queue(maxsize=queue_max)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._replica = f"{socket.gethostname()[:64]}:{os.getpid()}"
        self._counters = _Counters.get()
        self.written = 0
        self.dropped = 0
        self._last_log = -_LOG_EVERY_S
        self._next_rollup = time.monotonic() + 60.0  # not while the server is still starting

    @classmethod
    def from_env(cls, store: UsageStore) -> UsageLedger:
        env = settings()
        return cls(store, flush_seconds=env.usage_flush_seconds, queue_max=env.usage_queue)

    # -- the request path (event loop): nothing here waits --------------------------------------------

    def watch(self, scope: Scope, send: Send) -> Send:
        """`send` that notes the response's status; a response the gateway answered itself (a refusal)
        is recorded when its last byte is sent. A forwarded one is recorded by `forwarded`'s callback."""
        entry = _Entry()
        scope[_SCOPE_KEY] = entry

        async def watched(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                entry.status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                if not entry.forwarded:
                    self._finish(entry, 0, 0)

        return watched

    @staticmethod
    def attribute(scope: Scope, tenant: str | None = None, alias: str | None = None,
                  ref: str | None = None) -> None:
        """Say who asked (tenant) and for what (alias as sent, the immutable reference served)."""
        entry: _Entry | None = scope.get(_SCOPE_KEY)
        if entry is None:
            return
        if tenant is not None:
            entry.tenant = tenant
        if alias is not None:
            entry.alias = alias[:200]
        if ref is not None:
            entry.ref = ref[:200]

    def forwarded(self, scope: Scope) -> Callable[[int, int, int], None] | None:
        """The callback `forward` calls with (status, prompt tokens, completion tokens) when vLLM's answer
        has gone by (or the client went away): the tokens are those the client was told."""
        entry: _Entry | None = scope.get(_SCOPE_KEY)
        if entry is None:
            return None
        entry.forwarded = True

        def done(status: int, prompt: int, completion: int) -> None:
            entry.status = status
            self._finish(entry, prompt, completion)

        return done

    def _finish(self, entry: _Entry, prompt: int, completion: int) -> None:
        if entry.done:
            return
        entry.done = True
        self.record(
            UsageEvent(
                event_id=uuid.uuid4().hex,
                at=time.time(),
                tenant=entry.tenant,
                alias=entry.alias,
                ref=entry.ref,
                status=entry.status or 500,
                prompt_tokens=prompt,
                completion_tokens=completion,
                latency_ms=(time.monotonic() - entry.start) * 1000.0,
                replica=self._replica,
            )
        )

    def record(self, event: UsageEvent) -> bool:
        """Queue one row; False (counted as dropped) when the queue is full. Never blocks."""
        if self._thread is None:
            self._start()
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._drop(1, "the queue is full")
            return False
        return True

    # -- the writer thread ------------------------------------------------------------------------------

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name="adapterhub-usage-ledger", daemon=True)
                self._thread.start()
                _RUNNING.add(self)

    def _run(self) -> None:
        while True:
            stopping = self._stop.wait(self.flush_seconds)
            self._drain(stopping)
            if stopping:
                return
            if time.monotonic() >= self._next_rollup:
                self._next_rollup = time.monotonic() + ROLLUP_EVERY_S
                try:
                    self.store.roll_up()
                except AdapterHubError as exc:
                    logger.warning("adapterhub: usage ledger roll-up failed (retried in an hour): %s",
                                   exc.message)

    def _drain(self, stopping: bool) -> None:
        while True:
            batch: list[UsageEvent] = []
            while len(batch) < BATCH_MAX:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not batch:
                return
            self._write(batch, stopping)

    def _write(self, batch: list[UsageEvent], stopping: bool) -> None:
        tries = 0
        while True:
            try:
                self.store.write(batch)
            except AdapterHubError as exc:
                tries += 1
                self._log(f"usage ledger write failed ({len(batch)} rows kept, retrying): {exc.message}")
                if stopping and tries >= STOP_RETRIES:
                    self._drop(len(batch), "the database cannot be written at the stop")
                    return
                # While retrying, new rows wait in the queue (and drop when it is full).
                if self._stop.wait(min(2.0**tries, 10.0)) and not stopping:
                    stopping = True
                continue
            except Exception:  # a bug, not an outage: keep the writer alive for the rows that follow
                logger.exception("adapterhub: usage ledger batch of %d rows could not be written", len(batch))
                self._drop(len(batch), "the batch could not be written (see the log)")
                return
            self.written += len(batch)
            self._counters.written.inc(len(batch))
            return

    def _drop(self, n: int, why: str) -> None:
        self.dropped += n
        self._counters.dropped.inc(n)
        self._log(f"usage ledger dropped {n} rows ({self.dropped} so far): {why}")

    def _log(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.warning("adapterhub: %s", text)

    # -- stopping ---------------------------------------------------------------------------------------

    def pending(self) -> int:
        """Rows queued and not yet written."""
        return self._queue.qsize()

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the writer (the server's clean stop calls this)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        else:
            self._drain(stopping=True)


_RUNNING: weakref.WeakSet[UsageLedger] = weakref.WeakSet()  # writers whose thread runs in this process


@atexit.register
def close_all(timeout: float = 30.0) -> None:
    """Close every ledger writer of this process (each writes what it queued): at interpreter exit."""
    for ledger in list(_RUNNING):
        ledger.close(timeout)
        _RUNNING.discard(ledger)


def open_ledger(db: Any) -> UsageLedger | None:
    """The ledger in the tenant store's database `db` (a `Database`), configured from the environment;
    None when `ADAPTERHUB_USAGE_LEDGER=0`."""
    if not enabled_by_env():
        return None
    return UsageLedger.from_env(UsageStore(db))
