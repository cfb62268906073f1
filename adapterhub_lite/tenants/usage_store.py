"""The usage ledger's tables in the tenant store's database: one row per answered request, daily roll-ups.

`usage_events` holds one row per inference request the gateway answered (time, tenant, alias, immutable
reference, prompt and completion tokens, HTTP status, latency; never the prompt or the answer). Rows
older than the retention (`ADAPTERHUB_USAGE_RETENTION_DAYS`, default 35) are summed per UTC day into
`usage_daily` and deleted; daily rows older than `ADAPTERHUB_USAGE_DAILY_DAYS` (default 800) are deleted.
So the ledger holds at most retention x request rate raw rows, plus one row per day and distinct
(tenant, alias, ref, status) for the daily window: bounded, since tenants, aliases and refs are the
store's and the registry's own names (a model name a client made up is never stored).

The tables have their own schema version (`usage_schema_version` in `meta`, see db/schema.py) so the
ledger migrates independently of the tenant tables. Every replica writes here; each row carries a
random `event_id` (unique), so a batch retried after a commit whose outcome was lost is not counted twice.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from adapterhub_lite.db import Database, meta_table, migrate
from adapterhub_lite.errors import ErrorKind, ServingError
from adapterhub_lite.settings import Settings, env_name, settings

SCHEMA_KEY = "usage_schema_version"
SCHEMA_VERSION = 1
ENV_RETENTION_DAYS = env_name("usage_retention_days")
ENV_DAILY_DAYS = env_name("usage_daily_days")
DEFAULT_RETENTION_DAYS: int = Settings.model_fields["usage_retention_days"].default
DEFAULT_DAILY_DAYS: int = Settings.model_fields["usage_daily_days"].default
API_MAX_ROWS = 100_000  # rows in one admin API answer (the CLI export streams any number)
_DAY = 86400.0

By = Literal["tenant", "adapter", "day"]
BY_CHOICES: tuple[str, ...] = ("tenant", "adapter", "day")
FORMATS: tuple[str, ...] = ("csv", "jsonl", "parquet")

metadata = sa.MetaData()
meta_table(metadata)
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only
usage_events = sa.Table(
    "usage_events",
    metadata,
    sa.Column("id", _ID, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.Text, nullable=False, unique=True),
    sa.Column("at", sa.Float, nullable=False),  # unix time the answer ended
    sa.Column("day", sa.Text, nullable=False),  # its UTC date, YYYY-MM-DD (what roll-ups group by)
    sa.Column("tenant", sa.Text, nullable=False),  # "" before authentication, "admin" for the admin key
    sa.Column("alias", sa.Text, nullable=False),  # the model name the client sent, once it resolved
    sa.Column("ref", sa.Text, nullable=False),  # the immutable reference served ("" for the base)
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),
    sa.Column("replica", sa.Text, nullable=False),  # host:pid of the writer
    sa.Index("usage_events_at", "at"),
    sa.Index("usage_events_day", "day"),
)
usage_daily = sa.Table(
    "usage_daily",
    metadata,
    sa.Column("day", sa.Text, primary_key=True),
    sa.Column("tenant", sa.Text, primary_key=True),
    sa.Column("alias", sa.Text, primary_key=True),
    sa.Column("ref", sa.Text, primary_key=True),
    sa.Column("status", sa.Integer, primary_key=True),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("prompt_tokens", sa.BigInteger, nullable=False),
    sa.Column("completion_tokens", sa.BigInteger, nullable=False),
    sa.Column("latency_ms", sa.Float, nullable=False),  # the sum
)
_e, _d = usage_events.c, usage_daily.c


@dataclass(frozen=True)
class UsageEvent:
    """One answered request, as recorded."""

    event_id: str
    at: float
    tenant: str
    alias: str
    ref: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    replica: str

    def row(self) -> dict[str, object]:
        return {**asdict(self), "day": day_of(self.at)}


@dataclass(frozen=True)
class UsageRow:
    """One line of a report: a group's totals."""

    key: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def day_of(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d")


def parse_time(text: str) -> float:
    """A CLI/API time: an ISO date or date-time (UTC unless it says otherwise), or unix seconds."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ServingError(
            f"not a time: {text[:40]!r}",
            hint="use a date (2026-12-01), a date-time (2026-12-01T13:00) or unix seconds",
            kind=ErrorKind.INVALID,
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _upsert_daily(con: Connection, dialect: str, row: dict[str, object]) -> None:
    """Add `row`'s counts to its day's roll-up (creating it)."""
    ins = (postgresql if dialect == "postgresql" else sqlite).insert(usage_daily).values(**row)
    ex = ins.excluded
    con.execute(
        ins.on_conflict_do_update(
            index_elements=["day", "tenant", "alias", "ref", "status"],
            set_={
                "requests": _d.requests + ex.requests,
                "prompt_tokens": _d.prompt_tokens + ex.prompt_tokens,
                "completion_tokens": _d.completion_tokens + ex.completion_tokens,
                "latency_ms": _d.latency_ms + ex.latency_ms,
            },
        )
    )


class UsageStore:
    """Reads and writes the ledger tables of one database (the tenant store's). Thread-safe."""

    def __init__(self, location: str | Path | Database) -> None:
        if isinstance(location, Database):
            self.db = location
        else:
            self.db = Database(location, error=ServingError, what="usage ledger")
        migrate(self.db, metadata, SCHEMA_VERSION, key=SCHEMA_KEY)
        env = settings()
        self.retention_days = env.usage_retention_days
        self.daily_days = env.usage_daily_days
        ins = postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert
        # A batch retried after a lost commit: rows already there are skipped, never doubled.
        self._insert = ins(usage_events).on_conflict_do_nothing(index_elements=["event_id"])

    @classmethod
    def open(cls, location: str | None = None) -> UsageStore:
        """The ledger in the tenant store at `location`, `$ADAPTERHUB_TENANTS_DB` or the default."""
        from adapterhub_lite.db import sqlite_path
        from adapterhub_lite.tenants.store import default_db_path

        location = location or default_db_path()
        try:
            path = sqlite_path(location)
        except ValueError:
            path = None  # Database names the problem
        if path is not None and not path.is_file():
            raise ServingError(
                f"no tenant store at {path}",
                hint="pass the tenant store with --db, or set ADAPTERHUB_TENANTS_DB",
                kind=ErrorKind.NOT_FOUND,
            )
        return cls(location)

    def close(self) -> None:
        self.db.close()

    # -- writing ---------------------------------------------------------------------------------------

    def write(self, events: list[UsageEvent]) -> int:
        """Insert a batch in one transaction; returns how many rows were new."""
        if not events:
            return 0
        with self.db.write() as con:
            result = con.execute(self._insert, [e.row() for e in events])
        return max(result.rowcount, 0)

    def roll_up(self, now: float | None = None) -> tuple[int, int]:
        """Sum raw rows of days past the retention into `usage_daily` and delete them; delete daily rows
        past their own window. One transaction (replicas doing it at once queue: SQLite's write lock, an
        advisory lock on PostgreSQL). Returns (raw rows rolled up, daily rows deleted)."""
        now = time.time() if now is None else now
        cutoff = day_of(now - self.retention_days * _DAY)  # days before this one are rolled up
        daily_cutoff = day_of(now - self.daily_days * _DAY)
        group = (_e.day, _e.tenant, _e.alias, _e.ref, _e.status)
        with self.db.write() as con:
            if self.db.dialect == "postgresql":
                con.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('adapterhub-usage-rollup'))"))
            sums = con.execute(
                sa.select(
                    *group,
                    sa.func.count().label("requests"),
                    sa.func.sum(_e.prompt_tokens).label("prompt_tokens"),
                    sa.func.sum(_e.completion_tokens).label("completion_tokens"),
                    sa.func.sum(_e.latency_ms).label("latency_ms"),
                )
                .where(_e.day < cutoff)
                .group_by(*group)
            ).all()
            for r in sums:
                _upsert_daily(con, self.db.dialect, dict(r._mapping))
            rolled = con.execute(sa.delete(usage_events).where(_e.day < cutoff)).rowcount
            dropped = con.execute(sa.delete(usage_daily).where(_d.day < daily_cutoff)).rowcount
        return rolled, dropped

    # -- reading ---------------------------------------------------------------------------------------

    def report(self, since: float, until: float, by: str) -> list[UsageRow]:
        """Totals per tenant, adapter (immutable reference; "" is the base model or a refused request)
        or UTC day, for requests answered in [since, until). Days already rolled up count whole."""
        if by not in BY_CHOICES:
            raise ServingError(f"cannot group by {by[:20]!r}", hint="use tenant, adapter or day",
                               kind=ErrorKind.INVALID)
        totals: dict[str, list[int]] = {}
        raw_key = {"tenant": _e.tenant, "adapter": _e.ref, "day": _e.day}[by]
        day_key = {"tenant": _d.tenant, "adapter": _d.ref, "day": _d.day}[by]
        with self.db.read() as con:
            raw = con.execute(
                sa.select(
                    raw_key,
                    sa.func.count(),
                    sa.func.sum(sa.case((_e.status >= 400, 1), else_=0)),
                    sa.func.sum(_e.prompt_tokens),
                    sa.func.sum(_e.completion_tokens),
                )
                .where(_e.at >= since, _e.at < until)
                .group_by(raw_key)
            ).all()
            daily = con.execute(
                sa.select(
                    day_key,
                    sa.func.sum(_d.requests),
                    sa.func.sum(sa.case((_d.status >= 400, _d.requests), else_=0)),
                    sa.func.sum(_d.prompt_tokens),
                    sa.func.sum(_d.completion_tokens),
                )
                .where(_d.day >= day_of(since), _d.day <= _last_day(until))
                .group_by(day_key)
            ).all()
        for key, *counts in [*raw, *daily]:
            acc = totals.setdefault(key, [0, 0, 0, 0])
            for i, value in enumerate(counts):
                acc[i] += int(value or 0)
        return [UsageRow(k, *v) for k, v in sorted(totals.items())]

    def records(
        self, since: float, until: float, limit: int | None = None
    ) -> Iterator[dict[str, object]]:
        """What an export holds, oldest first: the daily roll-ups in range (`granularity` "day"), then each
        request still kept raw (`granularity` "request"), streamed from the database (one read
        transaction). With `limit`: ServingError (INVALID) before the first row when there are more."""
        days = (_d.day >= day_of(since), _d.day <= _last_day(until))
        with self.db.read() as con:
            if limit is not None:
                count = con.execute(
                    sa.select(sa.func.count()).select_from(usage_events).where(_e.at >= since, _e.at < until)
                ).scalar() or 0
                count += con.execute(
                    sa.select(sa.func.count()).select_from(usage_daily).where(*days)
                ).scalar() or 0
                if count > limit:
                    raise ServingError(
                        f"{count} usage rows in that range, over the limit of {limit} for one answer",
                        hint="ask for a shorter range (since/until) several times, or use "
                        "`adapterhub usage export`",
                        kind=ErrorKind.INVALID,
                    )
            stream = con.execution_options(yield_per=5000)
            for r in stream.execute(
                sa.select(usage_daily).where(*days).order_by(_d.day, _d.tenant, _d.alias, _d.ref, _d.status)
            ):
                yield {
                    "granularity": "day", "time": r.day, "tenant": r.tenant, "alias": r.alias, "ref": r.ref,
                    "status": r.status, "requests": r.requests, "prompt_tokens": r.prompt_tokens,
                    "completion_tokens": r.completion_tokens, "latency_ms": round(r.latency_ms, 3),
                    "event_id": "", "replica": "",
                }
            for r in stream.execute(
                sa.select(usage_events).where(_e.at >= since, _e.at < until).order_by(_e.at, _e.id)
            ):
                yield {
                    "granularity": "request",
                    "time": dt.datetime.fromtimestamp(r.at, dt.UTC).isoformat(timespec="milliseconds"),
                    "tenant": r.tenant, "alias": r.alias, "ref": r.ref, "status": r.status, "requests": 1,
                    "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                    "latency_ms": round(r.latency_ms, 3), "event_id": r.event_id, "replica": r.replica,
                }

    def counts(self) -> tuple[int, int]:
        """(raw rows, daily rows): what the ledger holds now."""
        with self.db.read() as con:
            raw = con.execute(sa.select(sa.func.count()).select_from(usage_events)).scalar() or 0
            daily = con.execute(sa.select(sa.func.count()).select_from(usage_daily)).scalar() or 0
        return int(raw), int(daily)


COLUMNS = ("granularity", "time", "tenant", "alias", "ref", "status", "requests", "prompt_tokens",
           "completion_tokens", "latency_ms", "event_id", "replica")


def _last_day(until: float) -> str:
    # A rolled-up day counts when it starts before `until` (whole days: its raw rows are gone).
    return day_of(max(until - 1e-3, 0.0))


def _lines(records: Iterable[dict[str, object]], fmt: str) -> Iterator[bytes]:
    if fmt == "jsonl":
        for r in records:
            yield json.dumps(r, separators=(",", ":")).encode() + b"\n"
        return
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow(r)
        if out.tell() > 1 << 16:
            yield out.getvalue().encode()
            out.seek(0)
            out.truncate()
    yield out.getvalue().encode()


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ServingError(f"unknown export format {fmt[:20]!r}", hint="use csv, jsonl or parquet",
                           kind=ErrorKind.INVALID)


def render(records: Iterable[dict[str, object]], fmt: str) -> bytes:
    """Records as CSV (with a header) or JSON lines. Every string in a record is a tenant, alias or
    reference name checked when it was created, so no cell can start a spreadsheet formula."""
    _check_format(fmt)
    return b"".join(_lines(records, fmt))


def export(store: UsageStore, path: Path, fmt: str, since: float, until: float) -> int:
    """Stream the records in [since, until) into `path` atomically (a complete file or none); their count.
    Memory stays flat however many rows (parquet: one row group per 50000 rows)."""
    from adapterhub_lite.atomic import atomic_open

    _check_format(fmt)
    count = 0

    def counted() -> Iterator[dict[str, object]]:
        nonlocal count
        for r in store.records(since, until):
            count += 1
            yield r

    if fmt != "parquet":
        with atomic_open(path, durable=True) as fh:
            for chunk in _lines(counted(), fmt):
                fh.write(chunk)
        return count
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ServingError("parquet export needs pyarrow, which is not installed here",
                           hint="pip install pyarrow, or export --format csv or jsonl",
                           kind=ErrorKind.INVALID) from None
    ints = ("status", "requests", "prompt_tokens", "completion_tokens")
    schema = pa.schema([(c, pa.int64() if c in ints else pa.float64() if c == "latency_ms" else pa.string())
                        for c in COLUMNS])
    with atomic_open(path, durable=True) as fh, pq.ParquetWriter(fh, schema) as writer:
        batch: list[dict[str, object]] = []
        for r in counted():
            batch.append(r)
            if len(batch) >= 50_000:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                batch.clear()
        writer.write_table(pa.Table.from_pylist(batch, schema=schema))
    return count
