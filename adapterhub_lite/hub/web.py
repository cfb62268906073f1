"""The web catalog: a search page, a page per namespace and per adapter, rendered on the server (Jinja2).

Pages show only what the caller may read (an anonymous visitor: public adapters); an adapter the caller
may not read answers the same 404 page as one that does not exist. No page carries a script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from adapterhub_lite.bundles.card import CARD_FILE
from adapterhub_lite.bundles.naming import check_name, semver_key
from adapterhub_lite.bundles.signing import SIGNATURES_FILE, check_signatures, key_id
from adapterhub_lite.errors import AdapterHubError, ErrorKind, http_status
from adapterhub_lite.hub.access import not_found
from adapterhub_lite.hub.render import card_html, loss_history, loss_svg
from adapterhub_lite.hub.tokens import HubError

_ENV = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
)


def _page(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_ENV.get_template(template).render(**context), status_code=status_code)


def _error_page(exc: AdapterHubError) -> HTMLResponse:
    return _page("error.html", http_status(exc), status=http_status(exc), message=exc.message, q="")


async def not_found_page(request: Request) -> Response:
    return _error_page(HubError("no such page", kind=ErrorKind.NOT_FOUND))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "n/a" if v is None else str(v)


def _metrics(training: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    m = (training or {}).get("metrics")
    if not isinstance(m, dict):
        return []
    parts = [m.get(k) if isinstance(m.get(k), dict) else {} for k in ("base", "adapter", "transfer_gain")]
    keys = [k for k in ("loss", "perplexity", "exact_match") if any(k in p for p in parts)]
    return [(k, *(_fmt(p.get(k)) for p in parts)) for k in keys]


async def search_page(request: Request) -> Response:
    hub, caller = request.app.state.hub, request.state.caller
    q = (request.query_params.get("q") or "")[:200]
    rows, _ = await run_in_threadpool(hub.search, caller, q, None, None)
    return _page("search.html", q=q, rows=rows)


async def namespace_page(request: Request) -> Response:
    hub, caller = request.app.state.hub, request.state.caller
    ns = request.path_params["namespace"]
    try:
        check_name(ns, "namespace", HubError)
    except HubError:
        return _error_page(not_found(ns))

    def rows() -> list:
        return caller.visible(hub.registry, hub.catalog.search(f"{ns}/"))

    found = [p for p in await run_in_threadpool(rows) if p.namespace == ns]
    if not found:
        return _error_page(not_found(ns))
    return _page("namespace.html", namespace=ns, rows=found, q="")


def _adapter_context(request: Request, ns: str, name: str) -> dict[str, Any]:
    hub, caller = request.app.state.hub, request.state.caller
    package = f"{ns}/{name}"
    if not caller.can_read(hub.registry, package):
        raise not_found(package)
    versions = [p for p in hub.versions(ns) if p.name == name]
    if not versions:
        raise not_found(package)
    try:
        p = hub.registry.resolve(package)
    except AdapterHubError:
        p = versions[-1]  # every version yanked: show the newest, flagged
    lease = hub.bundle(p)
    try:
        d = lease.path
        m = hub.manifest_of(p.ref, d)
        signatures = (d / SIGNATURES_FILE).read_bytes() if (d / SIGNATURES_FILE).is_file() else None
        card = (d / CARD_FILE).read_text(encoding="utf-8", errors="replace")
    finally:
        hub.cache.release(lease)
    signers: list[str] = []
    if signatures is not None:
        trusted = {key_id(k) for k in getattr(hub.registry, "trusted_keys", [])}
        signers = [
            s + (" (trusted by this hub)" if s in trusted else "")
            for s in check_signatures(signatures, p.digest, [])
        ]
    history = loss_history(m.training)
    adapter_m = (m.training or {}).get("metrics") or {}
    evals = {
        who: adapter_m.get(who, {}).get("loss")
        for who in ("base", "adapter")
        if isinstance(adapter_m.get(who), dict)
    }
    return dict(
        p=p,
        m=m,
        q="",
        versions=sorted(versions, key=lambda v: semver_key(v.version), reverse=True),
        signers=signers,
        metrics=_metrics(m.training),
        plot=loss_svg(history, evals),
        has_history=bool(history),
        card=card_html(card),
        hub_url=hub.config.public_url or _own_address(request),
    )


def _own_address(request: Request) -> str:
    """The address this hub listens on (never the request's Host header, which the client chose)."""
    server = request.scope.get("server")
    if not server or server[1] is None:
        return "http://HUB"
    host, port = server
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


async def adapter_page(request: Request) -> Response:
    ns, name = request.path_params["namespace"], request.path_params["name"]
    try:
        ctx = await run_in_threadpool(_adapter_context, request, ns, name)
    except AdapterHubError as exc:
        if exc.kind == ErrorKind.NOT_FOUND or exc.kind == ErrorKind.INVALID:
            return _error_page(not_found(f"{ns}/{name}"))
        return _error_page(exc)
    return _page("adapter.html", **ctx)


def routes() -> list[Route]:
    return [
        Route("/", search_page),
        Route("/{namespace}", namespace_page),
        Route("/{namespace}/{name}", adapter_page),
    ]
