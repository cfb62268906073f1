"""Schema versions: a `meta` table holding `schema_version`, and numbered upgrades to reach the code's.

An empty database gets the current schema at once. A database older than the code is upgraded step by
step inside one transaction (PostgreSQL DDL is transactional; SQLite's is too), serialized against
other processes opening it at the same moment. A database newer than the code is refused: an older
program must not write into a schema it does not know.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from adapterhub_lite.db.engine import Database
from adapterhub_lite.errors import ErrorKind

Upgrade = Callable[[Connection], None]

META = "meta"
VERSION_KEY = "schema_version"


def meta_table(metadata: sa.MetaData) -> sa.Table:
    """The key/value table that holds `schema_version` (and anything else a store keeps there)."""
    return sa.Table(
        META,
        metadata,
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def stored_version(con: Connection, legacy: Callable[[Connection], int], key: str = VERSION_KEY) -> int:
    """The schema version recorded under `key`; `legacy(con)` for databases made before it was."""
    if not sa.inspect(con).has_table(META):
        return legacy(con)
    row = con.execute(sa.text("SELECT value FROM meta WHERE key = :key"), {"key": key}).scalar()
    return int(row) if row is not None else legacy(con)


def migrate(
    db: Database,
    metadata: sa.MetaData,
    latest: int,
    upgrades: Mapping[int, Upgrade] | None = None,
    legacy: Callable[[Connection], int] = lambda con: 0,
    key: str = VERSION_KEY,
) -> int:
    """Bring the database to schema `latest`; returns the version found before.

    `upgrades[v]` turns version v-1 into v; version 0 (nothing there) gets `metadata.create_all`.
    `key` names the version in `meta`: a set of tables with a life of its own in the same database (the
    usage ledger and the rollouts beside the tenant store) keeps its own version there, so no migration
    waits on, or renumbers, another's.
    """
    with db.read() as con:  # the usual case, without taking the write lock
        if stored_version(con, legacy, key) == latest:
            return latest
    if db.dialect == "sqlite":
        try:
            raw = db.engine.raw_connection()  # WAL is persistent and cannot be set inside a transaction
            try:
                raw.cursor().execute("PRAGMA journal_mode = WAL")
            finally:
                raw.close()
        except Exception as e:  # noqa: BLE001 - any driver error becomes the caller's error class
            raise db.failure(e) from None
    with db.write() as con:
        if db.dialect == "postgresql":
            # Two processes creating the same database at once: the second waits, then sees v=latest.
            con.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('adapterhub-schema'))"))
        found = stored_version(con, legacy, key)
        if found > latest:
            raise db.error(
                f"{db.what} {db.shown} has schema version {found}, newer than this adapterhub-lite "
                f"understands ({latest})",
                hint="upgrade adapterhub-lite here: a newer version has already migrated this database",
                kind=ErrorKind.INTERNAL,
            )
        if found == 0:
            metadata.create_all(con)
        else:
            for version in range(found + 1, latest + 1):
                (upgrades or {})[version](con)
        if found != latest:
            meta_table(sa.MetaData()).create(con, checkfirst=True)
            con.execute(sa.text("DELETE FROM meta WHERE key = :key"), {"key": key})
            con.execute(
                sa.text("INSERT INTO meta (key, value) VALUES (:key, :v)"), {"key": key, "v": str(latest)}
            )
    return found
