"""The usage ledger on the admin API (admin key only, checked by the middleware before this runs).

    GET /adapterhub/v1/usage?since=&until=&by=tenant|adapter|day      totals, as `adapterhub usage report`
    GET /adapterhub/v1/usage/export?since=&until=&format=csv|jsonl   the rows, as `adapterhub usage export`

Times are ISO dates/date-times (UTC) or unix seconds; the range defaults to the last 30 days. An export
answers at most `API_MAX_ROWS` rows (a narrower range gets the rest); queries run off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Literal
from urllib.parse import parse_qsl

from pydantic import BaseModel, ConfigDict, ValidationError

from adapterhub_lite.errors import AdapterHubError
from adapterhub_lite.serving.gateway.asgi import Scope, Send, send_error, send_json, send_project_error
from adapterhub_lite.tenants.usage_store import API_MAX_ROWS, day_of, parse_time, render

if TYPE_CHECKING:
    from adapterhub_lite.tenants.usage_store import UsageStore

DEFAULT_RANGE_S = 30 * 86400.0
_MAX_QUERY_BYTES = 1024
_TYPES = {"csv": b"text/csv; charset=utf-8", "jsonl": b"application/x-ndjson"}


class UsageQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: str | None = None
    until: str | None = None
    by: Literal["tenant", "adapter", "day"] = "tenant"
    format: Literal["csv", "jsonl"] = "jsonl"

    def window(self) -> tuple[float, float]:
        until = parse_time(self.until) if self.until else time.time()
        since = parse_time(self.since) if self.since else until - DEFAULT_RANGE_S
        return since, until


async def usage_route(store: UsageStore | None, route: str, scope: Scope, send: Send) -> None:
    """Answer GET usage or GET usage/export."""
    if store is None:
        await send_error(send, 404, "the usage ledger is off on this server (ADAPTERHUB_USAGE_LEDGER=0)",
                         "NotFoundError")
        return
    raw = scope.get("query_string", b"")
    try:
        if len(raw) > _MAX_QUERY_BYTES:
            raise ValueError
        query = UsageQuery.model_validate(dict(parse_qsl(raw.decode("ascii"), strict_parsing=False)))
    except (ValueError, ValidationError, UnicodeDecodeError):
        await send_error(send, 400, "query: since, until (ISO time or unix seconds), by "
                         "(tenant|adapter|day), format (csv|jsonl)", "BadRequestError")
        return
    try:
        since, until = query.window()
        if route == "usage":
            rows = await asyncio.to_thread(store.report, since, until, query.by)
            await send_json(send, 200, {
                "since": since, "until": until, "by": query.by,
                "rows": [{"key": r.key, "requests": r.requests, "errors": r.errors,
                          "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                          "total_tokens": r.total_tokens} for r in rows],
            })
            return
        records = await asyncio.to_thread(lambda: list(store.records(since, until, API_MAX_ROWS)))
        body = await asyncio.to_thread(render, records, query.format)
    except AdapterHubError as exc:
        await send_project_error(send, exc, exc.message)
        return
    name = f"usage-{day_of(since)}-{day_of(until)}.{query.format}"
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", _TYPES[query.format]),
        (b"content-length", str(len(body)).encode()),
        (b"content-disposition", f'attachment; filename="{name}"'.encode()),
    ]})
    await send({"type": "http.response.body", "body": body})
