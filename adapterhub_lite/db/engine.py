"""One database from a location string: a SQLite file (the default) or a PostgreSQL server.

Both go through SQLAlchemy Core, so the registry index and the tenant store have one code path and
one exception hierarchy; psycopg 3 is the PostgreSQL driver underneath (and carries LISTEN/NOTIFY,
see `changes.py`). Errors come out as the caller's `AdapterHubError` class with a kind: a locked,
stopped or unreachable database is UNAVAILABLE with `retry_after`, a full or broken disk INTERNAL.
Unique-constraint violations (`sqlalchemy.exc.IntegrityError`) are left to the caller, which knows
what a duplicate means.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.pool import QueuePool

from adapterhub_lite.errors import AdapterHubError, ErrorKind

SUPPORTED = "a file path, sqlite:///PATH or postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME"
RETRY_AFTER_S = 2.0
_PG_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
# libpq settings for every PostgreSQL connection (the pool's and the change feed's), so that a server
# that is gone never holds a request for long: a stopped server refuses at once; a connection attempt
# to a dead host ends after `connect_timeout` s; a query to a host that died or was cut off ends when
# its unacknowledged bytes are `tcp_user_timeout` ms old, and an idle connection to it is found dead
# by keepalives; a query stuck on a lock or a slow server ends at `statement_timeout`. (A server
# process that is frozen while its host still acknowledges packets is bounded by none of these: the
# change feed's probe deadline, `ADAPTERHUB_DB_SILENCE_SECONDS` in `changes.py`, turns that into 503s.)
PG_CONNECT_ARGS: dict[str, object] = {
    "connect_timeout": 5,
    "application_name": "adapterhub-lite",
    "options": "-c statement_timeout=30000",
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
}
POOL_TIMEOUT_S = 10  # waiting for a pooled connection when every one is busy


def is_url(location: str) -> bool:
    """Whether `location` is written as a URL (`scheme://...`) rather than a path."""
    return "://" in location


def redact(url: str) -> str:
    """`url` with any password replaced by ***, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (exc.ArgumentError, ValueError):
        return url.split("@")[-1] if "@" in url else url


def sqlite_path(location: str) -> Path | None:
    """The file a path or sqlite:/// URL names; None for a PostgreSQL URL. Refuses other schemes."""
    if not is_url(location):
        return Path(location).expanduser()
    scheme = location.split("://", 1)[0].lower()
    if scheme == "sqlite":
        rest = location[len("sqlite:///") :] if location.startswith("sqlite:///") else ""
        if not rest:
            raise ValueError("sqlite URLs are sqlite:///relative/path or sqlite:////absolute/path")
        return Path(rest).expanduser()
    if scheme in _PG_SCHEMES:
        return None
    raise ValueError(f"unknown scheme {scheme!r}")


class Database:
    """An engine plus transactions that turn driver errors into `error` (the caller's error class).

    `location` is a path or URL (see SUPPORTED); `what` names the database in messages
    ("the registry index", "the tenant store").
    """

    def __init__(self, location: str | Path, *, error: type[AdapterHubError], what: str) -> None:
        self.error, self.what = error, what
        raw = str(location)
        try:
            path = sqlite_path(raw)
        except ValueError as e:
            raise error(
                f"{what} {redact(raw)!r}: {e}",
                hint=f"use {SUPPORTED}",
                kind=ErrorKind.INVALID,
            ) from None
        self.path = path
        if path is not None:
            self.dialect = "sqlite"
            self.shown = str(path)
            self.engine = _sqlite_engine(path)
        else:
            self.dialect = "postgresql"
            url = make_url(raw).set(drivername="postgresql+psycopg")
            self.url: URL = url
            self.shown = url.set(drivername="postgresql").render_as_string(hide_password=True)
            self.engine = sa.create_engine(
                url,
                pool_size=4,
                max_overflow=8,
                pool_timeout=POOL_TIMEOUT_S,
                pool_pre_ping=True,  # a server restarted under us: stale connections are replaced
                connect_args=dict(PG_CONNECT_ARGS),
            )
        self._pid = os.getpid()
        self._pid_lock = threading.Lock()

    def _engine(self) -> sa.Engine:
        # Pooled connections must not cross a fork (vLLM starts worker processes).
        if os.getpid() != self._pid:
            with self._pid_lock:
                if os.getpid() != self._pid:
                    self.engine.dispose(close=False)
                    self._pid = os.getpid()
        return self.engine

    # -- transactions --------------------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (a consistent snapshot on SQLite; read committed on PostgreSQL)."""
        try:
            with self._engine().connect() as con, con.begin():
                yield con
        except exc.IntegrityError:
            raise
        except exc.SQLAlchemyError as e:
            raise self.failure(e) from None

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction: all of it is committed, or none of it. SQLite writers queue
        (BEGIN IMMEDIATE, busy timeout); PostgreSQL writers rely on constraints and row locks."""
        try:
            with self._engine().connect() as con:
                con.execution_options(adapterhub_write=True)
                with con.begin():
                    yield con
        except exc.IntegrityError:
            raise
        except exc.SQLAlchemyError as e:
            raise self.failure(e) from None

    def notify(self, con: Connection, channel: str) -> None:
        """Tell listeners of `channel` that this transaction changed something (sent at commit).

        SQLite needs nothing: readers see `PRAGMA data_version` move."""
        if self.dialect == "postgresql":
            con.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": channel})

    def integrity_ok(self) -> bool:
        """SQLite's own integrity check; PostgreSQL checks its pages itself (always True here)."""
        if self.dialect != "sqlite":
            return True
        with self.read() as con:
            return con.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"

    def close(self) -> None:
        self.engine.dispose()

    # -- errors --------------------------------------------------------------------------------

    def failure(self, e: BaseException) -> AdapterHubError:
        """The project error for a driver error, with its kind and what to check."""
        text = str(getattr(e, "orig", None) or e).strip().splitlines()
        detail = text[0] if text else type(e).__name__
        where = f"{self.what} {self.shown}"
        low = detail.lower()
        if self.dialect == "sqlite":
            if "locked" in low or "busy" in low:
                return self.error(
                    f"{where}: {detail}",
                    hint="another process holds it for too long; try again",
                    kind=ErrorKind.UNAVAILABLE,
                    retry_after=RETRY_AFTER_S,
                )
            if "unable to open" in low:
                return self.error(
                    f"{where}: cannot open the database file ({detail})",
                    hint="check that its folder exists and is writable",
                    kind=ErrorKind.UNAVAILABLE,
                    retry_after=RETRY_AFTER_S,
                )
            return self.error(
                f"{where}: {detail}",
                hint="check the disk (space, errors); restore the file from a backup if it is damaged",
                kind=ErrorKind.INTERNAL,
            )
        if isinstance(e, exc.OperationalError | exc.InterfaceError) or getattr(
            e, "connection_invalidated", False
        ):
            return self.error(
                f"{where}: cannot reach the database ({detail})",
                hint="check that the PostgreSQL server is running and reachable, and the URL's host, "
                "port, database name, user and password",
                kind=ErrorKind.UNAVAILABLE,
                retry_after=RETRY_AFTER_S,
            )
        return self.error(
            f"{where}: {detail}",
            hint="check the server's log; the database may need a newer adapterhub-lite",
            kind=ErrorKind.INTERNAL,
        )


def _sqlite_engine(path: Path) -> sa.Engine:
    # A small pool: opening a SQLite connection (and its PRAGMAs) costs far more than a lookup, and
    # a server authenticates on every request. `Database._engine` drops the pool across a fork.
    engine = sa.create_engine(
        URL.create("sqlite", database=str(path)),
        poolclass=QueuePool,
        pool_size=4,
        max_overflow=8,
        connect_args={"timeout": 30.0, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_con, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_con.isolation_level = None  # no implicit transactions: BEGIN is ours (below)
        for pragma in ("foreign_keys = ON", "synchronous = FULL", "busy_timeout = 30000"):
            dbapi_con.execute(f"PRAGMA {pragma}")

    @event.listens_for(engine, "begin")
    def _on_begin(con: Connection) -> None:
        # Writers take the write lock up front, so two writers queue instead of one failing later.
        write = con.get_execution_options().get("adapterhub_write")
        con.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine
