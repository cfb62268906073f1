"""Hub tokens: random, shown once, stored as a sha256 hash, bound to one namespace and one scope.

A token reads `ahub_<id>_<secret>`: the id finds the row without a scan, the secret (32 random bytes)
is compared by hash in constant time. The store is a database through `adapterhub_lite.db` (the layer
the registry index uses): a SQLite file in the hub's state folder by default, or a `postgresql://` URL
(`hub serve --tokens-db URL`), so several hub replicas can share one account store.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from adapterhub_lite import keys
from adapterhub_lite.bundles.naming import check_name
from adapterhub_lite.db import Database, migrate
from adapterhub_lite.errors import AdapterHubError, ErrorKind
from adapterhub_lite.settings import env_name

TOKENS_FILE = "tokens.sqlite"
ENV_TOKENS_DB = env_name("hub_tokens_db")
PREFIX = "ahub_"
SCOPES = ("read", "publish", "admin")
_MAX_TOKEN_CHARS = 200

# Its own table name and its own version key in `meta` (db/schema.py): a tokens table may share a
# PostgreSQL database with a registry index or a tenant store, each with a version of its own.
SCHEMA_KEY = "hub_tokens_schema_version"
# 1: the `tokens` table of SQLite stores made before the database layer; 2: `hub_tokens`.
SCHEMA_VERSION = 2
_metadata = sa.MetaData()
_tokens = sa.Table(
    "hub_tokens",
    _metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("scope", sa.Text, nullable=False),
    sa.Column("hash", sa.Text, nullable=False),
    sa.Column("created", sa.Text, nullable=False),
    sa.Column("revoked", sa.Integer, nullable=False, server_default="0"),
    sa.Column("note", sa.Text, nullable=False, server_default=""),
)
_t = _tokens.c


def _legacy_version(con: Connection) -> int:
    """Stores made before the version key: `hub_tokens` is version 2, SQLite's old `tokens` version 1."""
    inspector = sa.inspect(con)
    if inspector.has_table("hub_tokens"):
        return 2
    return 1 if con.dialect.name == "sqlite" and inspector.has_table("tokens") else 0


def _upgrade_to_2(con: Connection) -> None:
    """The same columns under the table's own name (it may share a database with other stores)."""
    _tokens.create(con)
    con.exec_driver_sql(
        "INSERT INTO hub_tokens (id, namespace, scope, hash, created, revoked, note)"
        " SELECT id, namespace, scope, hash, created, revoked, note FROM tokens"
    )
    con.exec_driver_sql("DROP TABLE tokens")


class HubError(AdapterHubError):
    """A hub request or hub administration failed."""


@dataclass(frozen=True)
class TokenInfo:
    """One token as the store records it (never the token itself)."""

    id: str
    namespace: str
    scope: str
    created: str
    revoked: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bad_token() -> HubError:
    return HubError(
        "invalid or revoked token",
        hint="create one with `adapterhub hub token NAMESPACE`",
        kind=ErrorKind.UNAUTHENTICATED,
    )


def _info(r: Row, revoked: bool | None = None) -> TokenInfo:
    m = r._mapping
    return TokenInfo(
        m["id"],
        m["namespace"],
        m["scope"],
        m["created"],
        bool(m["revoked"]) if revoked is None else revoked,
        m["note"],
    )


class TokenStore:
    """Tokens of one hub, in the database at `location` (a SQLite path or URL, or a PostgreSQL URL)."""

    def __init__(self, location: str | Path) -> None:
        self.db = Database(location, error=HubError, what="hub token store")
        if self.db.path is not None:
            self.db.path.parent.mkdir(parents=True, exist_ok=True)
        upgrades = {2: _upgrade_to_2}
        migrate(self.db, _metadata, SCHEMA_VERSION, upgrades, legacy=_legacy_version, key=SCHEMA_KEY)
        if self.db.path is not None:
            self.db.path.chmod(0o600)  # hashes only, but nobody else's business

    @property
    def shown(self) -> str:
        return self.db.shown

    def create(self, namespace: str, scope: str, note: str = "") -> tuple[str, TokenInfo]:
        """Make a token; return (the token, shown once; its record)."""
        check_name(namespace, "namespace", HubError)
        if scope not in SCOPES:
            raise HubError(f"unknown scope {scope!r}", hint=f"use one of: {', '.join(SCOPES)}")
        token_id = keys.new_id()
        secret = keys.mint("")
        info = TokenInfo(
            token_id, namespace, scope, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), False, note[:200]
        )
        with self.db.write() as con:
            con.execute(
                sa.insert(_tokens).values(
                    id=token_id,
                    namespace=namespace,
                    scope=scope,
                    hash=keys.digest(secret),
                    created=info.created,
                    note=info.note,
                )
            )
        return f"{PREFIX}{token_id}_{secret}", info

    def list(self) -> list[TokenInfo]:
        with self.db.read() as con:
            rows = con.execute(sa.select(_tokens).order_by(_t.namespace, _t.created, _t.id)).all()
        return [_info(r) for r in rows]

    def revoke(self, token_or_id: str) -> TokenInfo:
        """Revoke a token given by its id (as `list` shows it) or by the token itself."""
        token_id = token_or_id
        if token_or_id.startswith(PREFIX):
            token_id = token_or_id[len(PREFIX) :].split("_", 1)[0]
        with self.db.write() as con:
            done = con.execute(sa.update(_tokens).where(_t.id == token_id).values(revoked=1))
            if done.rowcount == 0:
                raise HubError(
                    f"no token with id {token_id!r}",
                    hint="`adapterhub hub tokens` lists them",
                    kind=ErrorKind.NOT_FOUND,
                )
            r = con.execute(sa.select(_tokens).where(_t.id == token_id)).one()
        return _info(r, revoked=True)

    def check(self, token: str) -> TokenInfo:
        """The record of a valid, unrevoked token; UNAUTHENTICATED otherwise (one message for every case)."""
        bad = _bad_token()
        if len(token) > _MAX_TOKEN_CHARS or not token.startswith(PREFIX) or token.count("_") < 2:
            raise bad
        token_id, secret = token[len(PREFIX) :].split("_", 1)
        with self.db.read() as con:
            r = con.execute(sa.select(_tokens).where(_t.id == token_id)).first()
        if r is None or not keys.matches(secret, r._mapping["hash"]) or r._mapping["revoked"]:
            raise bad
        return _info(r, revoked=False)

    def require_active(self, token_id: str) -> None:
        """UNAUTHENTICATED unless the token with this id exists and is not revoked (now)."""
        with self.db.read() as con:
            r = con.execute(sa.select(_t.revoked).where(_t.id == token_id)).first()
        if r is None or r[0]:
            raise _bad_token()

    def close(self) -> None:
        self.db.close()
