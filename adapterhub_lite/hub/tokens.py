"""Hub tokens: random, shown once, stored as a sha256 hash, bound to one namespace and one scope.

A token reads `ahub_<id>_<secret>`: the id finds the row without a scan, the secret (32 random bytes)
is compared by hash in constant time. The store is a small SQLite file in the hub's state folder.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from adapterhub_lite.bundles.naming import check_name
from adapterhub_lite.errors import AdapterHubError, ErrorKind

TOKENS_FILE = "tokens.sqlite"
PREFIX = "ahub_"
SCOPES = ("read", "publish", "admin")
_MAX_TOKEN_CHARS = 200


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


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """Tokens of one hub (SQLite at `path`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, namespace TEXT NOT NULL,"
                " scope TEXT NOT NULL, hash TEXT NOT NULL, created TEXT NOT NULL,"
                " revoked INTEGER NOT NULL DEFAULT 0, note TEXT NOT NULL DEFAULT '')"
            )
        self.path.chmod(0o600)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        except sqlite3.Error as exc:
            raise HubError(
                f"cannot open the token store {self.path}: {exc}", kind=ErrorKind.INTERNAL
            ) from None
        con.row_factory = sqlite3.Row
        try:
            con.execute("BEGIN IMMEDIATE")
            yield con
            con.execute("COMMIT")
        except sqlite3.Error as exc:
            raise HubError(f"token store {self.path}: {exc}", kind=ErrorKind.UNAVAILABLE) from None
        finally:
            con.close()

    def create(self, namespace: str, scope: str, note: str = "") -> tuple[str, TokenInfo]:
        """Make a token; return (the token, shown once; its record)."""
        check_name(namespace, "namespace", HubError)
        if scope not in SCOPES:
            raise HubError(f"unknown scope {scope!r}", hint=f"use one of: {', '.join(SCOPES)}")
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        info = TokenInfo(
            token_id, namespace, scope, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), False, note[:200]
        )
        with self._tx() as con:
            con.execute(
                "INSERT INTO tokens (id, namespace, scope, hash, created, note) VALUES (?,?,?,?,?,?)",
                (token_id, namespace, scope, _hash(secret), info.created, info.note),
            )
        return f"{PREFIX}{token_id}_{secret}", info

    def list(self) -> list[TokenInfo]:
        with self._tx() as con:
            rows = con.execute("SELECT * FROM tokens ORDER BY namespace, created, id").fetchall()
        return [
            TokenInfo(r["id"], r["namespace"], r["scope"], r["created"], bool(r["revoked"]), r["note"])
            for r in rows
        ]

    def revoke(self, token_or_id: str) -> TokenInfo:
        """Revoke a token given by its id (as `list` shows it) or by the token itself."""
        token_id = token_or_id
        if token_or_id.startswith(PREFIX):
            token_id = token_or_id[len(PREFIX) :].split("_", 1)[0]
        with self._tx() as con:
            cur = con.execute("UPDATE tokens SET revoked=1 WHERE id=?", (token_id,))
            if cur.rowcount == 0:
                raise HubError(
                    f"no token with id {token_id!r}",
                    hint="`adapterhub hub tokens` lists them",
                    kind=ErrorKind.NOT_FOUND,
                )
            r = con.execute("SELECT * FROM tokens WHERE id=?", (token_id,)).fetchone()
        return TokenInfo(r["id"], r["namespace"], r["scope"], r["created"], True, r["note"])

    def check(self, token: str) -> TokenInfo:
        """The record of a valid, unrevoked token; UNAUTHENTICATED otherwise (one message for every case)."""
        bad = HubError(
            "invalid or revoked token",
            hint="create one with `adapterhub hub token NAMESPACE`",
            kind=ErrorKind.UNAUTHENTICATED,
        )
        if len(token) > _MAX_TOKEN_CHARS or not token.startswith(PREFIX) or token.count("_") < 2:
            raise bad
        token_id, secret = token[len(PREFIX) :].split("_", 1)
        with self._tx() as con:
            r = con.execute("SELECT * FROM tokens WHERE id=?", (token_id,)).fetchone()
        if r is None or not hmac.compare_digest(r["hash"], _hash(secret)) or r["revoked"]:
            raise bad
        return TokenInfo(r["id"], r["namespace"], r["scope"], r["created"], False, r["note"])
