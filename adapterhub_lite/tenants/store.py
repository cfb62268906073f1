"""Tenants, their API keys and their aliases, in a store of their own (SQLite file or PostgreSQL).

Keys are 256-bit random tokens and only their SHA-256 is stored. A slow password hash (bcrypt, argon2)
exists to protect low-entropy secrets against guessing; a 256-bit random key cannot be guessed, so a fast
hash loses nothing and lets the server find the tenant with one indexed lookup per request.

An alias (`support-bot`) points at an immutable full reference (`acme/support-bot@1.2.0`); moving it is
the hot swap, and moving it back is the rollback. Every move is kept in `alias_history`.

The server and the `adapterhub tenant` commands are different processes (or machines): SQLite in WAL
mode lets the server read while a command writes, and `data_version()` tells the server cheaply whether
anything changed since its last look (SQLite's `PRAGMA data_version`; PostgreSQL's LISTEN/NOTIFY, see
`db/changes.py`), so a promote is seen by the very next request.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import Connection

from adapterhub_lite import keys
from adapterhub_lite.bundles.naming import check_name
from adapterhub_lite.db import ChangeFeed, Database, meta_table, migrate
from adapterhub_lite.errors import ErrorKind, ServingError
from adapterhub_lite.settings import env_name, settings, state_dir

KEY_PREFIX = "ahk_"
CHANNEL = "adapterhub_tenants"
SCHEMA_VERSION = 2
_ALIAS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # both matched whole
_FULL_REF_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*@[0-9A-Za-z.+-]+")

metadata = sa.MetaData()
meta_table(metadata)
tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("namespace", sa.Text, nullable=False),
    sa.Column("key_hash", sa.Text, nullable=False, unique=True),
    sa.Column("key_hint", sa.Text, nullable=False),
    sa.Column("base_access", sa.Integer, nullable=False, server_default="0"),
    sa.Column("requests_per_minute", sa.Integer),
    sa.Column("tokens_per_minute", sa.Integer),
    sa.Column("revoked", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created", sa.Float, nullable=False),
    sa.Column("key_rotated", sa.Float, nullable=False),
)
aliases = sa.Table(
    "aliases",
    metadata,
    sa.Column("tenant", sa.Text, sa.ForeignKey("tenants.name", ondelete="CASCADE"), primary_key=True),
    sa.Column("alias", sa.Text, primary_key=True),
    sa.Column("ref", sa.Text, nullable=False),
    sa.Column("updated", sa.Float, nullable=False),
)
alias_history = sa.Table(
    "alias_history",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),  # the order of moves (was SQLite's rowid)
    sa.Column("tenant", sa.Text, nullable=False),
    sa.Column("alias", sa.Text, nullable=False),
    sa.Column("ref", sa.Text),
    sa.Column("at", sa.Float, nullable=False),
)
_t = tenants.c


def _legacy_version(con: Connection) -> int:
    # Stores made before schema versions: tenants/aliases/alias_history without alias_history.id.
    return 1 if sa.inspect(con).has_table("tenants") else 0


def _upgrade_to_2(con: Connection) -> None:
    """alias_history gets an explicit `id` (its order); rows keep SQLite's rowid order."""
    con.exec_driver_sql("ALTER TABLE alias_history RENAME TO alias_history_v1")
    alias_history.create(con)
    con.exec_driver_sql(
        "INSERT INTO alias_history (id, tenant, alias, ref, at) "
        "SELECT rowid, tenant, alias, ref, at FROM alias_history_v1 ORDER BY rowid"
    )
    con.exec_driver_sql("DROP TABLE alias_history_v1")


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
    """The stored form of an API key (`adapterhub_lite.keys.digest`)."""
    return keys.digest(key)


def new_key() -> str:
    """A fresh 256-bit API key."""
    return keys.mint(KEY_PREFIX)


def default_db_path() -> str:
    """`$ADAPTERHUB_TENANTS_DB` (a path or database URL), else `~/.adapterhub/tenants.db`."""
    return settings().tenants_db or str(state_dir() / "tenants.db")


def is_full_ref(ref: str) -> bool:
    """True for an immutable reference `namespace/name@version`."""
    return isinstance(ref, str) and _FULL_REF_RE.fullmatch(ref) is not None


def _invalid(message: str, hint: str | None = None) -> ServingError:
    return ServingError(message, hint, kind=ErrorKind.INVALID)


_COLS = (
    _t.name,
    _t.namespace,
    _t.key_hint,
    _t.base_access,
    _t.requests_per_minute,
    _t.tokens_per_minute,
    _t.revoked,
    _t.created,
)


# The server's lookups, built once (building a statement costs more than running it on SQLite).
_BY_NAME = sa.select(*_COLS).where(_t.name == sa.bindparam("name"))
_BY_KEY = sa.select(*_COLS).where(_t.key_hash == sa.bindparam("key_hash"), _t.revoked == 0)
_ALL_ALIASES = sa.select(aliases.c.tenant, aliases.c.alias, aliases.c.ref)


def _tenant(row: sa.Row) -> Tenant:
    return Tenant(
        name=row.name,
        namespace=row.namespace,
        key_hint=row.key_hint,
        base_access=bool(row.base_access),
        requests_per_minute=row.requests_per_minute,
        tokens_per_minute=row.tokens_per_minute,
        revoked=bool(row.revoked),
        created=row.created,
    )


class TenantStore:
    """The tenant database (a SQLite file or PostgreSQL). Safe to share between threads and processes."""

    def __init__(self, location: str | Path) -> None:
        self.db = Database(location, error=ServingError, what="tenant store")
        self.path = self.db.path  # the SQLite file (None on PostgreSQL)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ServingError(
                    f"cannot create the folder of the tenant store {self.path}: {e.strerror or e}",
                    hint=f"check the path and its permissions, or set {env_name('tenants_db')}",
                    kind=ErrorKind.INTERNAL,
                ) from None
        migrate(self.db, metadata, SCHEMA_VERSION, {2: _upgrade_to_2}, legacy=_legacy_version)
        self._feed: ChangeFeed | None = None
        self._feed_lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path | None = None) -> TenantStore:
        """Open (creating if needed) the store at `path`, `$ADAPTERHUB_TENANTS_DB` or the per-user default."""
        return cls(path if path is not None else default_db_path())

    def close(self) -> None:
        if self._feed is not None:
            self._feed.close()
        self.db.close()

    # -- reading ---------------------------------------------------------------------------------------

    def data_version(self) -> int:
        """Changes whenever another connection commits: the server's cheap 'did anything move?' probe
        (SQLite's `PRAGMA data_version`; on PostgreSQL a counter of NOTIFYs, no query)."""
        if self._feed is None:
            with self._feed_lock:
                if self._feed is None:
                    self._feed = ChangeFeed(self.db, CHANNEL)
        return self._feed.version()

    def get(self, name: str) -> Tenant:
        """The tenant called `name`; ServingError (NOT_FOUND) if there is none."""
        with self.db.read() as con:
            row = con.execute(_BY_NAME, {"name": name}).first()
        if row is None:
            raise ServingError(
                f"no tenant named {name!r}",
                hint="list them with `adapterhub tenant list`",
                kind=ErrorKind.NOT_FOUND,
            )
        return _tenant(row)

    def list_tenants(self) -> list[Tenant]:
        """All tenants, revoked ones included, by name."""
        with self.db.read() as con:
            return [_tenant(r) for r in con.execute(sa.select(*_COLS).order_by(_t.name))]

    def authenticate(self, key: str) -> Tenant | None:
        """The active tenant holding `key`, or None (unknown or revoked: the caller answers 401)."""
        with self.db.read() as con:
            row = con.execute(_BY_KEY, {"key_hash": hash_key(key)}).first()
        return _tenant(row) if row else None

    def aliases(self, tenant: str) -> dict[str, str]:
        """alias -> full reference for one tenant."""
        with self.db.read() as con:
            rows = con.execute(sa.select(aliases.c.alias, aliases.c.ref).where(aliases.c.tenant == tenant))
            return {r.alias: r.ref for r in rows}

    def all_aliases(self) -> dict[str, dict[str, str]]:
        """tenant -> {alias -> ref}, in one query (the server reloads this after every change)."""
        out: dict[str, dict[str, str]] = {}
        with self.db.read() as con:
            for tenant, alias, ref in con.execute(
                sa.select(aliases.c.tenant, aliases.c.alias, aliases.c.ref)
            ):
                out.setdefault(tenant, {})[alias] = ref
        return out

    def alias_history(self, tenant: str, alias: str) -> list[tuple[float, str | None]]:
        """(time, ref) moves of one alias, oldest first; ref None means removed."""
        h = alias_history.c
        with self.db.read() as con:
            rows = con.execute(
                sa.select(h.at, h.ref).where(h.tenant == tenant, h.alias == alias).order_by(h.id)
            ).all()
        return [(r.at, r.ref) for r in rows]

    # -- writing ---------------------------------------------------------------------------------------

    def _update(self, name: str, **values: object) -> None:
        with self.db.write() as con:
            if con.execute(sa.update(tenants).where(_t.name == name).values(**values)).rowcount == 0:
                raise ServingError(
                    f"no tenant named {name!r}",
                    hint="list them with `adapterhub tenant list`",
                    kind=ErrorKind.NOT_FOUND,
                )
            self.db.notify(con, CHANNEL)

    def add_tenant(
        self,
        name: str,
        *,
        namespace: str | None = None,
        base_access: bool = False,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> tuple[Tenant, str]:
        """Create a tenant; returns it and its API key, which is shown this once and never stored.

        Tenant names and namespaces follow the registry's namespace rules (a tenant reads the registry
        as its namespace)."""
        check_name(name, "tenant name", _invalid)  # type: ignore[arg-type]
        namespace = namespace or name
        check_name(namespace, "namespace", _invalid)  # type: ignore[arg-type]
        _check_limits(requests_per_minute, tokens_per_minute)
        key = new_key()
        now = time.time()
        try:
            with self.db.write() as con:
                con.execute(
                    sa.insert(tenants).values(
                        name=name,
                        namespace=namespace,
                        key_hash=hash_key(key),
                        key_hint=_hint(key),
                        base_access=int(base_access),
                        requests_per_minute=requests_per_minute,
                        tokens_per_minute=tokens_per_minute,
                        revoked=0,
                        created=now,
                        key_rotated=now,
                    )
                )
                self.db.notify(con, CHANNEL)
        except exc.IntegrityError:
            raise ServingError(
                f"a tenant named {name!r} already exists",
                hint="pick another name, or `adapterhub tenant rotate-key` to give it a new key",
                kind=ErrorKind.CONFLICT,
            ) from None
        return self.get(name), key

    def rotate_key(self, name: str) -> str:
        """Replace a tenant's key (the old one stops working at once) and re-activate it; returns the key."""
        key = new_key()
        self._update(name, key_hash=hash_key(key), key_hint=_hint(key), key_rotated=time.time(), revoked=0)
        return key

    def revoke(self, name: str) -> None:
        """Disable a tenant's key; its aliases stay so that `rotate-key` can bring it back."""
        self._update(name, revoked=1)

    def set_base_access(self, name: str, allowed: bool) -> None:
        """Allow (or forbid) a tenant to call the base model itself."""
        self._update(name, base_access=int(allowed))

    def set_limits(self, name: str, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Set a tenant's rate limits (None: unlimited)."""
        _check_limits(requests_per_minute, tokens_per_minute)
        self._update(name, requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute)

    def set_alias(self, tenant: str, alias: str, ref: str) -> str | None:
        """Point `alias` at the full reference `ref`; returns the previous reference (None if new).

        The caller checks that the tenant may read `ref` (see `tenants.view.promote`); this only stores.
        """
        self.get(tenant)
        if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
            raise _invalid(
                f"invalid alias {alias!r}",
                hint="use letters, digits, '.', '-' or '_' (no '/' or '@': those belong to full references)",
            )
        if not is_full_ref(ref):
            raise _invalid(
                f"an alias must point at a full reference namespace/name@version, not {ref!r}",
                hint="name the exact version, e.g. acme/support-bot@1.0.0",
            )
        now = time.time()
        a = aliases.c
        with self.db.write() as con:
            previous = con.execute(
                sa.select(a.ref).where(a.tenant == tenant, a.alias == alias).with_for_update()
            ).scalar()
            if previous is None:
                con.execute(sa.insert(aliases).values(tenant=tenant, alias=alias, ref=ref, updated=now))
            else:
                con.execute(
                    sa.update(aliases)
                    .where(a.tenant == tenant, a.alias == alias)
                    .values(ref=ref, updated=now)
                )
            con.execute(sa.insert(alias_history).values(tenant=tenant, alias=alias, ref=ref, at=now))
            self.db.notify(con, CHANNEL)
        return previous

    def remove_alias(self, tenant: str, alias: str) -> None:
        """Delete an alias; ServingError (NOT_FOUND) if it does not exist."""
        a = aliases.c
        with self.db.write() as con:
            if con.execute(sa.delete(aliases).where(a.tenant == tenant, a.alias == alias)).rowcount == 0:
                raise ServingError(f"tenant {tenant!r} has no alias {alias!r}", kind=ErrorKind.NOT_FOUND)
            con.execute(sa.insert(alias_history).values(tenant=tenant, alias=alias, ref=None, at=time.time()))
            self.db.notify(con, CHANNEL)


def _hint(key: str) -> str:
    return keys.shown(key, KEY_PREFIX)


def _check_limits(rpm: int | None, tpm: int | None) -> None:
    for label, value in (("requests per minute", rpm), ("tokens per minute", tpm)):
        if value is not None and value <= 0:
            raise _invalid(f"{label} must be a positive number, not {value}", hint="omit it for no limit")
