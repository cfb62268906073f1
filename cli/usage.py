"""`adapterhub usage ...`: what tenants used, from the usage ledger in the tenant store (any replica's rows).

Imports only the ledger's store (SQLAlchemy), never vLLM: a report is a query.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from cli.common import print_json, run_cli

DbOpt = Annotated[str | None, typer.Option("--db", help="tenant store (else $ADAPTERHUB_TENANTS_DB)")]
SinceOpt = Annotated[
    str | None, typer.Option("--since", help="from (ISO date/time, UTC, or unix seconds); default: 30 days")
]
UntilOpt = Annotated[str | None, typer.Option("--until", help="until, excluded (same forms); default now")]
DEFAULT_RANGE_S = 30 * 86400.0


def _window(since: str | None, until: str | None) -> tuple[float, float]:
    from adapterhub_lite.tenants.usage_store import parse_time

    end = parse_time(until) if until else time.time()
    start = parse_time(since) if since else end - DEFAULT_RANGE_S
    return start, end


def register(app: typer.Typer) -> None:
    usage_app = typer.Typer(help="Usage from the ledger: per-tenant, per-adapter, per-day tokens; exports.")
    app.add_typer(usage_app, name="usage")

    @usage_app.command("report")
    @run_cli
    def report(
        since: SinceOpt = None,
        until: UntilOpt = None,
        by: Annotated[str, typer.Option("--by", help="tenant, adapter or day")] = "tenant",
        db: DbOpt = None,
        as_json: Annotated[bool, typer.Option("--json")] = False,
    ) -> None:
        """Print requests, errors and tokens per tenant, adapter (immutable reference) or UTC day."""
        from adapterhub_lite.tenants.usage_store import UsageStore

        start, end = _window(since, until)
        rows = UsageStore.open(db).report(start, end, by)
        if as_json:
            print_json([{"key": r.key, "requests": r.requests, "errors": r.errors,
                         "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                         "total_tokens": r.total_tokens} for r in rows])
            return
        from rich.console import Console
        from rich.table import Table

        from adapterhub_lite.display import safe
        from adapterhub_lite.tenants.usage_store import day_of

        title = f"usage by {by}, {day_of(start)} .. {day_of(end)} (UTC)"
        table = Table(title=title)
        empty = {"tenant": "(unauthenticated)", "adapter": "(base model or refused)"}.get(by, "")
        table.add_column(by, no_wrap=True)
        for name in ("requests", "errors", "prompt tokens", "completion tokens", "total tokens"):
            table.add_column(name, justify="right")
        for r in rows:
            table.add_row(safe(r.key) or empty, *(str(v) for v in (
                r.requests, r.errors, r.prompt_tokens, r.completion_tokens, r.total_tokens)))
        if not rows:
            table.caption = "no requests in this range"
        Console(highlight=False, soft_wrap=False).print(table, markup=False)

    @usage_app.command("export")
    @run_cli
    def export_cmd(
        output: Annotated[Path, typer.Option("--output", "-o", help="file to write (replaced atomically)")],
        fmt: Annotated[str, typer.Option("--format", help="csv, jsonl or parquet")] = "csv",
        since: SinceOpt = None,
        until: UntilOpt = None,
        db: DbOpt = None,
    ) -> None:
        """Write every ledger row in the range (requests, and days already rolled up) to a file."""
        from adapterhub_lite.display import safe
        from adapterhub_lite.errors import ErrorKind, ServingError
        from adapterhub_lite.tenants.usage_store import FORMATS, UsageStore, export

        if fmt not in FORMATS:
            raise ServingError(f"unknown format {fmt[:20]!r}", hint="use csv, jsonl or parquet",
                               kind=ErrorKind.INVALID)
        if not output.parent.is_dir():
            raise ServingError(f"no folder {safe(str(output.parent))}", hint="create it first",
                               kind=ErrorKind.NOT_FOUND)
        start, end = _window(since, until)
        n = export(UsageStore.open(db), output, fmt, start, end)
        typer.echo(f"{n} rows written to {safe(str(output))}")

    @usage_app.command("roll-up")
    @run_cli
    def roll_up(db: DbOpt = None) -> None:
        """Roll rows past the retention up per day now (servers do it hourly by themselves)."""
        from adapterhub_lite.tenants.usage_store import UsageStore

        store = UsageStore.open(db)
        rolled, dropped = store.roll_up()
        raw, daily = store.counts()
        typer.echo(f"rolled up {rolled} rows, deleted {dropped} expired daily rows; "
                   f"the ledger holds {raw} request rows and {daily} daily rows")
