"""`adapterhub top`: a live view of a serving server, from its `/metrics` and its admin status.

Each frame reads the server twice in a row of frames: the counters on `/metrics` (parsed with
prometheus_client's text parser) and `GET /adapterhub/v1/status` (the hot set and the disk cache), both
with the admin key. Rates (requests, tokens and errors per second) are the difference of two scrapes over
the time between them, per tenant and per adapter; the first frame takes two scrapes `interval` apart.
Tenant and adapter names come from the server and are printed through `display.safe`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from adapterhub_lite.display import safe
from adapterhub_lite.errors import ErrorKind, ServingError

STATUS_PATH = "/adapterhub/v1/status"
METRICS_PATH = "/metrics"
MAX_METRICS_BYTES = 32 * 1024 * 1024  # a page of adapterhub's bounded series and vLLM's is far smaller
_TIMEOUT_S = 10.0

# What is read from /metrics: sample name -> the counter it adds to.
_REQUESTS = "adapterhub_requests_total"
_PROMPT = "adapterhub_prompt_tokens_total"
_COMPLETION = "adapterhub_completion_tokens_total"
_ERRORS = "adapterhub_errors_total"
_REJECTED = "adapterhub_rejected_total"
_LOADS = "adapterhub_adapter_loads_total"
_EVICTIONS = "adapterhub_adapter_evictions_total"


@dataclass
class Counts:
    """Cumulative counters of one tenant or adapter."""

    requests: float = 0.0
    tokens: float = 0.0
    errors: float = 0.0

    def minus(self, other: Counts) -> Counts:
        return Counts(self.requests - other.requests, self.tokens - other.tokens, self.errors - other.errors)


@dataclass
class Scrape:
    """One reading of the server."""

    at: float
    tenants: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    adapters: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    loads: float = 0.0
    evictions: float = 0.0
    status: dict[str, Any] = field(default_factory=dict)


@dataclass
class Row:
    """A line of the view: totals since the server started, and rates over the last interval."""

    name: str
    requests: float
    requests_per_s: float
    tokens_per_s: float
    errors: float
    errors_per_s: float


@dataclass
class Frame:
    tenants: list[Row]
    adapters: list[Row]
    loads: float
    evictions: float
    status: dict[str, Any]
    interval_s: float


def parse_metrics(text: str, at: float) -> Scrape:
    """The adapterhub counters of a Prometheus text page."""
    from prometheus_client.parser import text_string_to_metric_families

    scrape = Scrape(at)
    try:
        families = list(text_string_to_metric_families(text))
    except ValueError as exc:
        raise ServingError(f"the server's /metrics page is not Prometheus text: {exc}",
                           kind=ErrorKind.INVALID) from None
    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            tenant, adapter = labels.get("tenant", ""), labels.get("adapter", "")
            if name == _REQUESTS:
                scrape.tenants[tenant].requests += value
                scrape.adapters[adapter].requests += value
            elif name in (_PROMPT, _COMPLETION):
                scrape.tenants[tenant].tokens += value
                scrape.adapters[adapter].tokens += value
            elif name == _ERRORS:
                scrape.tenants[tenant].errors += value
                scrape.adapters[adapter].errors += value
            elif name == _REJECTED:  # refused before vLLM (no adapter yet); "" is "no tenant known"
                scrape.tenants[tenant or "(unauthenticated)"].errors += value
                scrape.tenants[tenant or "(unauthenticated)"].requests += value
            elif name == _LOADS:
                scrape.loads += value
            elif name == _EVICTIONS:
                scrape.evictions += value
    return scrape


def _rows(before: dict[str, Counts], after: dict[str, Counts], seconds: float) -> list[Row]:
    rows = []
    for name, now in after.items():
        delta = now.minus(before.get(name, Counts()))
        rows.append(Row(name, now.requests, max(delta.requests, 0.0) / seconds,
                        max(delta.tokens, 0.0) / seconds, now.errors, max(delta.errors, 0.0) / seconds))
    return sorted(rows, key=lambda r: (-r.requests_per_s, -r.requests, r.name))


def frame(before: Scrape, after: Scrape) -> Frame:
    """The view between two scrapes (a counter that went down, a restarted server, counts as 0)."""
    seconds = max(after.at - before.at, 1e-6)
    return Frame(
        tenants=_rows(before.tenants, after.tenants, seconds),
        adapters=_rows(before.adapters, {k: v for k, v in after.adapters.items() if k}, seconds),
        loads=after.loads,
        evictions=after.evictions,
        status=after.status,
        interval_s=seconds,
    )


class Server:
    """The two reads of a server, with the admin key."""

    def __init__(self, url: str, admin_key: str, client: Any = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ServingError(f"--server must be an http(s) URL, not {safe(url)}", kind=ErrorKind.INVALID)
        auth = {"authorization": f"Bearer {admin_key}"}
        self.client = client or httpx.Client(timeout=_TIMEOUT_S, headers=auth)

    def _get(self, path: str) -> Any:
        import httpx

        try:
            with self.client.stream("GET", self.url + path) as response:
                if response.status_code in (401, 403):
                    raise ServingError(f"{self.url} refused the admin key ({response.status_code})",
                                       hint="pass the server's admin key with --admin-key",
                                       kind=ErrorKind.UNAUTHENTICATED)
                if response.status_code != 200:
                    raise ServingError(f"{self.url}{path} answered {response.status_code}",
                                       kind=ErrorKind.UNAVAILABLE)
                body = b""
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > MAX_METRICS_BYTES:
                        raise ServingError(f"{self.url}{path} sent more than {MAX_METRICS_BYTES} bytes",
                                           kind=ErrorKind.INVALID)
                return body
        except httpx.HTTPError as exc:
            raise ServingError(f"cannot reach {self.url}: {type(exc).__name__}: {exc}",
                               hint="is `adapterhub serve` running there?",
                               kind=ErrorKind.UNAVAILABLE) from None

    def scrape(self) -> Scrape:
        import json

        at = time.monotonic()
        scrape = parse_metrics(self._get(METRICS_PATH).decode("utf-8", "replace"), at)
        try:
            status = json.loads(self._get(STATUS_PATH))
        except ValueError:
            raise ServingError(f"{self.url}{STATUS_PATH} did not answer JSON",
                               kind=ErrorKind.INVALID) from None
        scrape.status = status if isinstance(status, dict) else {}
        return scrape

    def close(self) -> None:
        self.client.close()


def _table(title: str, rows: list[Row], limit: int) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left", expand=False)
    table.add_column(title.split()[0].lower())
    for column in ("requests", "req/s", "tokens/s", "errors", "err/s"):
        table.add_column(column, justify="right")
    for r in rows[:limit]:
        table.add_row(safe(r.name or "(base)", 80), f"{r.requests:.0f}", f"{r.requests_per_s:.2f}",
                      f"{r.tokens_per_s:.1f}", f"{r.errors:.0f}", f"{r.errors_per_s:.2f}")
    if len(rows) > limit:
        table.caption = f"{len(rows) - limit} more not shown"
    return table


def render(view: Frame, url: str, limit: int = 20) -> Any:
    """The frame as rich renderables (a header line, per-tenant and per-adapter tables, the hot set)."""
    from rich.console import Group
    from rich.text import Text

    status = view.status
    loaded = [str(x) for x in status.get("loaded", []) if isinstance(x, str)]
    cache = status.get("cache", [])
    mib = 1024 * 1024
    header = Text(
        f"{safe(url)}  rates over {view.interval_s:.1f} s   "
        f"hot set {len(loaded)}/{safe(status.get('capacity', '?'))}   "
        f"cache {len(cache) if isinstance(cache, list) else '?'} bundles, "
        f"{_num(status.get('cache_bytes')) / mib:.0f}/{_num(status.get('cache_max_bytes')) / mib:.0f} MiB   "
        f"loads {view.loads:.0f}  evictions {view.evictions:.0f}"
    )
    hot = Text("hot set: " + (", ".join(safe(x, 80) for x in loaded[:limit]) or "(empty)"))
    tables = _table("Tenants", view.tenants, limit), _table("Adapters", view.adapters, limit)
    return Group(header, *tables, hot)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def watch(server: Server, interval: float, once: bool, console: Any, limit: int = 20) -> Frame | None:
    """Read the server every `interval` seconds and show each frame on `console` (a rich Console), live
    until Ctrl-C; with `once`, print one frame and return it. Where the console is not a terminal (a pipe,
    a file) each frame is printed after the last, as `top -b` does."""
    from rich.live import Live

    def frames() -> Iterator[Frame]:
        before = server.scrape()
        while True:
            time.sleep(interval)
            after = server.scrape()
            yield frame(before, after)
            before = after

    try:
        views = frames()
        view = next(views)
        if once or not console.is_terminal:
            console.print(render(view, server.url, limit))
            if once:
                return view
            for view in views:
                console.print(render(view, server.url, limit))
        with Live(render(view, server.url, limit), console=console, auto_refresh=False) as live:
            for view in views:
                live.update(render(view, server.url, limit), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return None
