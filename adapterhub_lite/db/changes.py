"""A cheap "did anything change?" probe for a database another process writes.

SQLite: `PRAGMA data_version` on a connection of our own moves whenever any other connection commits
(a few microseconds, no file read beyond the WAL index). PostgreSQL: writers `NOTIFY` a channel inside
their transaction (delivered at commit) and one thread here `LISTEN`s on its own connection and counts
what arrives, so the probe is a memory read, never a query per request. While that connection is down
the probe raises UNAVAILABLE (a revoke could be missed: fail closed); after it reconnects the counter
moves once, so callers reload whatever they cached. A server that goes silent (packets dropped, a
frozen server whose host still acknowledges them: no TCP timeout fires for that) counts as down once
the listener's probe has waited `ADAPTERHUB_DB_SILENCE_SECONDS` for an answer; that probe is then cut
so the listener reconnects when the server answers again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import psycopg

from adapterhub_lite.db.engine import PG_CONNECT_ARGS, RETRY_AFTER_S, Database
from adapterhub_lite.errors import AdapterHubError, ErrorKind
from adapterhub_lite.settings import settings

logger = logging.getLogger(__name__)
POLL_S = 0.5  # how often the listener wakes to check whether it was closed


class ChangeFeed:
    """`version()` changes after every commit of another connection to `db` (on `channel`)."""

    def __init__(self, db: Database, channel: str) -> None:
        self.db, self.channel = db, channel
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._counter = 0
        self._down: str | None = None
        self.silence_s = settings().db_silence_seconds
        self._probe_since: float | None = None  # when the listener's unanswered probe was sent
        self._sock: socket.socket | None = None  # the listener's socket (a duplicate), to cut it
        self._raw = None
        self._thread: threading.Thread | None = None
        if db.dialect == "sqlite":
            try:
                self._raw = db.engine.raw_connection()
            except Exception as e:  # noqa: BLE001 - driver errors of any kind become the project's
                raise db.failure(e) from None
        else:
            conn = self._listen()  # synchronously: no change may slip between the caller's load and us
            self._thread = threading.Thread(
                target=self._run, args=(conn,), name="adapterhub-listen", daemon=True
            )
            self._thread.start()

    def version(self) -> int:
        """A number that differs from the last one whenever something may have changed."""
        if self._raw is not None:
            with self._lock:
                try:
                    return int(self._raw.cursor().execute("PRAGMA data_version").fetchone()[0])
                except Exception as e:  # noqa: BLE001
                    raise self.db.failure(e) from None
        since = self._probe_since
        if since is not None and time.monotonic() - since > self.silence_s:
            self._cut()  # frees the listener: its probe fails and it reconnects
            raise self._unavailable(f"no answer for {self.silence_s:g} s")
        if self._down is not None:
            raise self._unavailable(self._down)
        return self._counter

    def _unavailable(self, why: str) -> AdapterHubError:
        return self.db.error(
            f"{self.db.what} {self.db.shown}: lost the change feed ({why})",
            hint="check that the PostgreSQL server is running and reachable; this process reconnects "
            "by itself",
            kind=ErrorKind.UNAVAILABLE,
            retry_after=RETRY_AFTER_S,
        )

    def close(self) -> None:
        self._closed.set()
        self._cut()  # a listener waiting on a silent server
        if self._raw is not None:
            self._raw.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- PostgreSQL ----------------------------------------------------------------------------

    def _listen(self) -> psycopg.Connection:
        url = self.db.url
        try:
            conn = psycopg.connect(
                url.set(drivername="postgresql").render_as_string(hide_password=False),
                autocommit=True,
                **PG_CONNECT_ARGS,  # type: ignore[arg-type]
            )
            conn.execute(f'LISTEN "{self.channel}"')
        except psycopg.Error as e:
            raise self.db.failure(e) from None
        return conn

    def _watch(self, conn: psycopg.Connection | None) -> None:
        """Keep a duplicate of `conn`'s socket (None: drop it), so another thread can cut it."""
        sock = socket.socket(fileno=os.dup(conn.fileno())) if conn is not None else None
        with self._lock:
            old, self._sock = self._sock, sock
        if old is not None:
            old.close()

    def _cut(self) -> None:
        """Shut the listener's socket down: a read it waits on ends at once (EOF)."""
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _run(self, conn: psycopg.Connection | None) -> None:
        delay = 0.2
        self._watch(conn)
        while not self._closed.is_set():
            if conn is None:
                try:
                    conn = self._listen()
                except Exception as e:  # noqa: BLE001
                    self._down = str(e).splitlines()[0] if str(e) else type(e).__name__
                    self._closed.wait(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                self._watch(conn)
                with self._lock:
                    self._counter += 1  # whatever happened while we were away
                self._down, delay = None, 0.2
                logger.info("adapterhub: change feed of %s reconnected", self.db.shown)
            try:
                for _ in conn.notifies(timeout=POLL_S):
                    with self._lock:
                        self._counter += 1
                # A dead server is noticed only on I/O: probe the connection between batches.
                if conn.closed or conn.broken:
                    raise psycopg.OperationalError("connection closed")
                self._probe_since = time.monotonic()
                conn.execute("SELECT 1")
                self._probe_since = None
            except psycopg.Error as e:
                self._down = str(e).splitlines()[0] if str(e) else type(e).__name__
                self._probe_since = None  # after `_down`: `version()` never sees neither
                self._watch(None)
                logger.warning("adapterhub: change feed of %s lost: %s", self.db.shown, self._down)
                try:
                    conn.close()
                except psycopg.Error:
                    pass
                conn = None
                time.sleep(0)  # yield before reconnecting
        self._watch(None)
        if conn is not None:
            conn.close()
