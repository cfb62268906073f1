"""Tenants, their API keys and their aliases, in a SQLite store of their own.

Keys are 256-bit random tokens and only their SHA-256 is stored. A slow password hash (bcrypt, argon2)
exists to protect low-entropy secrets against guessing; a 256-bit random key cannot be guessed, so a fast
hash loses nothing and lets the server find the tenant with one indexed lookup per request.

An alias (`support-bot`) points at an immutable full reference (`acme/support-bot@1.2.0`); moving it is
the hot swap, and moving it back is the rollback. Every move is kept in `alias_history`.

The server and the `adapterhub tenant` commands are different processes: SQLite in WAL mode lets the
server read while a command writes, and `PRAGMA data_version` tells the server in microseconds whether
anything changed since its last look, so a promote is seen by the very next request.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from adapterhub_lite.errors import ServingError

TENANTS_DB_ENV = "ADAPTERHUB_TENANTS_DB"
KEY_PREFIX = "ahk_"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ALIAS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FULL_REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*@[0-9A-Za-z.+-]+$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    namespace TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,
    key_hint TEXT NOT NULL,
    base_access INTEGER NOT NULL DEFAULT 0,
    requests_per_minute INTEGER,
    tokens_per_minute INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    key_rotated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS aliases (
    tenant TEXT NOT NULL REFERENCES tenants(name) ON DELETE CASCADE,
    alias TEXT NOT NULL,
    ref TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (tenant, alias)
);
CREATE TABLE IF NOT EXISTS alias_history (
    tenant TEXT NOT NULL,
    alias TEXT NOT NULL,
    ref TEXT,
    at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Tenant:
    """One tenant as stored (never with its key)."""

    name: str
    namespace: str
    key_hint: str
    base_access: bool
    requests_per_minute: int | None
    tokens_per_minute: int | None
    revoked: bool
    created: float


def hash_key(key: str) -> str:
    """The stored form of an API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh 256-bit API key."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def default_db_path() -> Path:
    """`$ADAPTERHUB_TENANTS_DB`, else `~/.adapterhub/tenants.db`."""
    env = os.environ.get(TENANTS_DB_ENV)
    return Path(env).expanduser() if env else Path.home() / ".adapterhub" / "tenants.db"


def is_full_ref(ref: str) -> bool:
    """True for an immutable reference `namespace/name@version`."""
    return bool(_FULL_REF_RE.match(ref))


class TenantStore:
    """The tenant database. Safe to share between threads of one process and between processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, timeout=10.0, check_same_thread=False, isolation_level=None
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ServingError(
                f"cannot open the tenant database {self.path}: {exc}",
                hint=f"check the path and its permissions, or set {TENANTS_DB_ENV}",
            ) from exc
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path | None = None) -> TenantStore:
        """Open (creating if needed) the store at `path`, `$ADAPTERHUB_TENANTS_DB` or the per-user default."""
        return cls(path if path is not None else default_db_path())

    def close(self) -> None:
        self._conn.close()

    # -- reading ---------------------------------------------------------------------------------------

    def data_version(self) -> int:
        """Changes whenever another connection commits: the server's cheap 'did anything move?' probe."""
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])

    def _row_to_tenant(self, row: tuple) -> Tenant:
        return Tenant(
            name=row[0],
            namespace=row[1],
            key_hint=row[2],
            base_access=bool(row[3]),
            requests_per_minute=row[4],
            tokens_per_minute=row[5],
            revoked=bool(row[6]),
            created=row[7],
        )

    _COLS = "name, namespace, key_hint, base_access, requests_per_minute, tokens_per_minute, revoked, created"

    def get(self, name: str) -> Tenant:
        """The tenant called `name`; ServingError if there is none."""
        with self._lock:
            row = self._conn.execute(f"SELECT {self._COLS} FROM tenants WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise ServingError(f"no tenant named {name!r}", hint="list them with `adapterhub tenant list`")
        return self._row_to_tenant(row)

    def list_tenants(self) -> list[Tenant]:
        """All tenants, revoked ones included, by name."""
        with self._lock:
            rows = self._conn.execute(f"SELECT {self._COLS} FROM tenants ORDER BY name").fetchall()
        return [self._row_to_tenant(r) for r in rows]

    def authenticate(self, key: str) -> Tenant | None:
        """The active tenant holding `key`, or None (unknown or revoked: the caller answers 401)."""
        with self._lock:
            row = self._conn.execute(
                f"SELECT {self._COLS} FROM tenants WHERE key_hash = ? AND revoked = 0", (hash_key(key),)
            ).fetchone()
        return self._row_to_tenant(row) if row else None

    def aliases(self, tenant: str) -> dict[str, str]:
        """alias -> full reference for one tenant."""
        with self._lock:
            rows = self._conn.execute("SELECT alias, ref FROM aliases WHERE tenant = ?", (tenant,)).fetchall()
        return dict(rows)

    def all_aliases(self) -> dict[str, dict[str, str]]:
        """tenant -> {alias -> ref}, in one query (the server reloads this after every change)."""
        out: dict[str, dict[str, str]] = {}
        with self._lock:
            for tenant, alias, ref in self._conn.execute("SELECT tenant, alias, ref FROM aliases"):
                out.setdefault(tenant, {})[alias] = ref
        return out

    def alias_history(self, tenant: str, alias: str) -> list[tuple[float, str | None]]:
        """(time, ref) moves of one alias, oldest first; ref None means removed."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT at, ref FROM alias_history WHERE tenant = ? AND alias = ? ORDER BY rowid",
                (tenant, alias),
            ).fetchall()
        return [(r[0], r[1]) for r in rows]

    # -- writing ---------------------------------------------------------------------------------------

    def add_tenant(
        self,
        name: str,
        *,
        namespace: str | None = None,
        base_access: bool = False,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> tuple[Tenant, str]:
        """Create a tenant; returns it and its API key, which is shown this once and never stored."""
        if not _NAME_RE.match(name):
            raise ServingError(
                f"invalid tenant name {name!r}",
                hint="use 1-63 lowercase letters, digits, '-' or '_', starting with a letter or digit",
            )
        namespace = namespace or name
        if not _NAME_RE.match(namespace):
            raise ServingError(f"invalid namespace {namespace!r}", hint="use the same rules as tenant names")
        _check_limits(requests_per_minute, tokens_per_minute)
        key = new_key()
        now = time.time()
        try:
            with self._lock, self._conn:
                self._conn.execute(
                    "INSERT INTO tenants VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?)",
                    (
                        name,
                        namespace,
                        hash_key(key),
                        _hint(key),
                        int(base_access),
                        requests_per_minute,
                        tokens_per_minute,
                        now,
                        now,
                    ),
                )
        except sqlite3.IntegrityError:
            raise ServingError(
                f"a tenant named {name!r} already exists",
                hint="pick another name, or `adapterhub tenant rotate-key` to give it a new key",
            ) from None
        return self.get(name), key

    def rotate_key(self, name: str) -> str:
        """Replace a tenant's key (the old one stops working at once) and re-activate it; returns the key."""
        self.get(name)
        key = new_key()
        with self._lock, self._conn:
            self._conn.execute(
                "UPDATE tenants SET key_hash = ?, key_hint = ?, key_rotated = ?, revoked = 0 WHERE name = ?",
                (hash_key(key), _hint(key), time.time(), name),
            )
        return key

    def revoke(self, name: str) -> None:
        """Disable a tenant's key; its aliases stay so that `rotate-key` can bring it back."""
        self.get(name)
        with self._lock, self._conn:
            self._conn.execute("UPDATE tenants SET revoked = 1 WHERE name = ?", (name,))

    def set_base_access(self, name: str, allowed: bool) -> None:
        """Allow (or forbid) a tenant to call the base model itself."""
        self.get(name)
        with self._lock, self._conn:
            self._conn.execute("UPDATE tenants SET base_access = ? WHERE name = ?", (int(allowed), name))

    def set_limits(self, name: str, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Set a tenant's rate limits (None: unlimited)."""
        self.get(name)
        _check_limits(requests_per_minute, tokens_per_minute)
        with self._lock, self._conn:
            self._conn.execute(
                "UPDATE tenants SET requests_per_minute = ?, tokens_per_minute = ? WHERE name = ?",
                (requests_per_minute, tokens_per_minute, name),
            )

    def set_alias(self, tenant: str, alias: str, ref: str) -> str | None:
        """Point `alias` at the full reference `ref`; returns the previous reference (None if new).

        The caller checks that the tenant may read `ref` (see `serving.view.promote`); this only stores.
        """
        self.get(tenant)
        if not _ALIAS_RE.match(alias):
            raise ServingError(
                f"invalid alias {alias!r}",
                hint="use letters, digits, '.', '-' or '_' (no '/' or '@': those belong to full references)",
            )
        if not is_full_ref(ref):
            raise ServingError(
                f"an alias must point at a full reference namespace/name@version, not {ref!r}",
                hint="name the exact version, e.g. acme/support-bot@1.0.0",
            )
        now = time.time()
        with self._lock, self._conn:
            row = self._conn.execute(
                "SELECT ref FROM aliases WHERE tenant = ? AND alias = ?", (tenant, alias)
            ).fetchone()
            self._conn.execute(
                "INSERT INTO aliases VALUES (?, ?, ?, ?) "
                "ON CONFLICT(tenant, alias) DO UPDATE SET ref = excluded.ref, updated = excluded.updated",
                (tenant, alias, ref, now),
            )
            self._conn.execute("INSERT INTO alias_history VALUES (?, ?, ?, ?)", (tenant, alias, ref, now))
        return row[0] if row else None

    def remove_alias(self, tenant: str, alias: str) -> None:
        """Delete an alias; ServingError if it does not exist."""
        with self._lock, self._conn:
            cur = self._conn.execute("DELETE FROM aliases WHERE tenant = ? AND alias = ?", (tenant, alias))
            if cur.rowcount == 0:
                raise ServingError(f"tenant {tenant!r} has no alias {alias!r}")
            self._conn.execute(
                "INSERT INTO alias_history VALUES (?, ?, NULL, ?)", (tenant, alias, time.time())
            )


def _hint(key: str) -> str:
    # Enough to tell keys apart in `tenant list`, far too little to guess the rest.
    return key[: len(KEY_PREFIX) + 4] + "..."


def _check_limits(rpm: int | None, tpm: int | None) -> None:
    for label, value in (("requests per minute", rpm), ("tokens per minute", tpm)):
        if value is not None and value <= 0:
            raise ServingError(f"{label} must be a positive number, not {value}", hint="omit it for no limit")
