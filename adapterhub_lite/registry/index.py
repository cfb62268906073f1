"""The registry index: one SQLite database (WAL, explicit transactions) beside the blob store.

Each call opens its own short-lived connection, so a `Registry` can be shared between threads and
processes; WAL lets readers (the serving plugin) run while a publish writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapterhub_lite.errors import RegistryError

INDEX_FILE = "index.sqlite"
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packages (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    public INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version TEXT NOT NULL,
    digest TEXT NOT NULL,
    manifest_sha256 TEXT NOT NULL,
    signatures_sha256 TEXT,
    base_name TEXT NOT NULL,
    base_fingerprint TEXT NOT NULL,
    description TEXT NOT NULL,
    license TEXT NOT NULL,
    rank INTEGER NOT NULL,
    size INTEGER NOT NULL,
    created TEXT NOT NULL,
    published_at TEXT NOT NULL,
    yanked INTEGER NOT NULL DEFAULT 0,
    yank_reason TEXT NOT NULL DEFAULT '',
    UNIQUE (namespace, name, version),
    FOREIGN KEY (namespace, name) REFERENCES packages (namespace, name)
);
CREATE TABLE IF NOT EXISTS files (
    version_id INTEGER NOT NULL REFERENCES versions (id),
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (version_id, path)
);
CREATE TABLE IF NOT EXISTS tags (
    version_id INTEGER NOT NULL REFERENCES versions (id),
    tag TEXT NOT NULL,
    PRIMARY KEY (version_id, tag)
);
CREATE TABLE IF NOT EXISTS shares (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    grantee TEXT NOT NULL,
    PRIMARY KEY (namespace, name, grantee)
);
CREATE INDEX IF NOT EXISTS versions_base ON versions (base_fingerprint);
CREATE INDEX IF NOT EXISTS files_sha ON files (sha256);
"""


class Index:
    """Connections to the SQLite index at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; writers say BEGIN IMMEDIATE themselves.
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise RegistryError(f"cannot open the registry index {self.path}: {exc}") from None
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA foreign_keys = ON")
        con.execute("PRAGMA synchronous = FULL")
        con.execute("PRAGMA busy_timeout = 30000")
        return con

    def create(self) -> None:
        con = self._connect()
        try:
            con.execute("PRAGMA journal_mode = WAL")  # persistent; not allowed inside a transaction
        finally:
            con.close()
        with self.write() as con:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    con.execute(stmt)
            con.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        con = self._connect()
        try:
            yield con
        except sqlite3.Error as exc:
            raise self._error(exc) from None
        finally:
            con.close()

    def _error(self, exc: sqlite3.Error) -> RegistryError:
        busy = "locked" in str(exc) or "busy" in str(exc)
        return RegistryError(
            f"registry index {self.path}: {exc}",
            hint="another process holds the index for too long; try again"
            if busy
            else "run `adapterhub registry check`; restore the index from a backup if it is damaged",
        )

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all of it is committed, or none of it."""
        con = self._connect()
        try:
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._error(exc) from None
        finally:
            con.close()
