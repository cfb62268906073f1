"""The hub: a registry behind an HTTP API and a web catalog (one ASGI app, `create_app`).

State besides the registry lives in the hub's state folder (default `<registry>/hub`): the token store,
upload temp files, and the serving copies of bundles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from adapterhub_lite.bundles.manifest import MANIFEST_FILE, Manifest, parse_manifest
from adapterhub_lite.bundles.naming import Ref
from adapterhub_lite.bundles.naming import parse_ref as _parse_ref
from adapterhub_lite.errors import AdapterHubError, ErrorKind, http_status
from adapterhub_lite.hub.access import Caller
from adapterhub_lite.hub.cache import DEFAULT_MAX_BYTES, BundleCache
from adapterhub_lite.hub.catalog import Catalog
from adapterhub_lite.hub.tokens import TOKENS_FILE, HubError, TokenStore
from adapterhub_lite.hub.upload import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_UPLOAD, Uploads

MAX_RESULTS = 500
SECURITY_HEADERS = {
    # No script runs on any page of the hub, whatever a card says: the pages use none.
    "content-security-policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def state_dir_for(registry_location: str | Path) -> Path:
    """The default state folder of a hub over a local registry directory."""
    return Path(registry_location) / "hub"


@dataclass
class HubConfig:
    state_dir: Path
    max_upload: int = DEFAULT_MAX_UPLOAD
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    cache_bytes: int = DEFAULT_MAX_BYTES
    concurrent_publishes: int = 2
    # vLLM's own validator on every publish (None: when vLLM is importable, as `verify` does).
    vllm_check: bool | None = None
    public_url: str = ""
    # Bases this hub serves (fingerprint -> directory): a publish for one of them is shape-checked
    # against it, and the version records the fingerprint.
    bases: dict[str, Path] = field(default_factory=dict)
    # The token store's database (a path or URL); None: `tokens.sqlite` in `state_dir`.
    tokens_db: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Hub:
    """What every route shares: the registry, tokens, uploads and serving copies."""

    def __init__(self, registry: Any, config: HubConfig) -> None:
        self.registry = registry
        self.config = config
        self.tokens = TokenStore(config.tokens_db or config.state_dir / TOKENS_FILE)
        self.uploads = Uploads(
            config.state_dir / "uploads", config.max_upload, config.idle_timeout_s, config.vllm_check
        )
        self.cache = BundleCache(config.state_dir / "bundles", config.cache_bytes)
        self.publish_slots = anyio.Semaphore(config.concurrent_publishes)
        self.catalog = Catalog(lambda: self.versions(None), changed=_change_probe(registry))

    @staticmethod
    def parse_ref(ref: str) -> Ref:
        return _parse_ref(ref, HubError)

    def caller(self, authorization: str | None) -> Caller:
        if not authorization:
            return Caller()
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HubError("Authorization must be `Bearer TOKEN`", kind=ErrorKind.UNAUTHENTICATED)
        return Caller(self.tokens.check(token.strip()))

    def versions(self, namespace: str | None) -> list:
        reg = self.registry
        # `versions` is the registry's name for it from now on; `list` before its rename landed.
        return reg.versions(namespace) if hasattr(reg, "versions") else reg.list(namespace)

    def search(
        self,
        caller: Caller,
        q: str,
        base: str | None,
        tag: str | None,
        limit: int = MAX_RESULTS,
        offset: int = 0,
    ) -> tuple[list, int]:
        """One page of what `caller` may see among the matches, and how many matches there are."""
        if caller.token is None:  # anonymous: the public snapshot needs no filtering
            rows = self.catalog.search(q, base=base, tag=tag, public_only=True)
        else:
            rows = caller.visible(self.registry, self.catalog.search(q, base=base, tag=tag))
        return rows[offset : offset + min(limit, MAX_RESULTS)], len(rows)

    def manifest_of(self, ref: str, bundle_dir: Path) -> Manifest:
        return parse_manifest((bundle_dir / MANIFEST_FILE).read_bytes(), f"{ref}:{MANIFEST_FILE}")

    def publish_checked(self, caller: Caller, staged: Any) -> tuple[Any, Path]:
        """Publish an upload (`uploads.Staged`) for `caller` (blocking); the verified bundle becomes a
        serving copy."""

        def authorize(namespace: str) -> None:
            caller.require_write(self.registry, namespace)

        published, bundle = self.uploads.publish(self.registry, staged, authorize, self.config.bases)
        self.cache.adopt(bundle, published.digest)
        self.catalog.refresh()
        return published, bundle


def _change_probe(registry: Any) -> Any:
    """The registry index's "did anything change?" probe, when it has one (a local `Registry`)."""
    db = getattr(getattr(registry, "index", None), "db", None)
    if db is None:
        return None
    from adapterhub_lite.db import ChangeFeed
    from adapterhub_lite.registry.index import CHANGES_CHANNEL

    return ChangeFeed(db, CHANGES_CHANNEL).version


def error_response(exc: AdapterHubError) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    body = {"error": {"kind": str(exc.kind), "message": exc.message, "hint": exc.hint}}
    return JSONResponse(body, status_code=http_status(exc), headers=headers)


class _Guard:
    """Authenticates every request, turns project errors into JSON, adds the security headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        request = Request(scope)
        hub: Hub = scope["app"].state.hub
        try:
            scope.setdefault("state", {})
            scope["state"]["caller"] = hub.caller(request.headers.get("authorization"))
            await self.app(scope, receive, send_with_headers)
        except AdapterHubError as exc:
            await error_response(exc)(scope, receive, send_with_headers)


def create_app(registry: Any, config: HubConfig) -> Starlette:
    """The hub's ASGI app over `registry` (any object with the `Registry` interface)."""
    from adapterhub_lite.hub import api, web

    app = Starlette(routes=[*api.ROUTES, *web.routes()], middleware=[Middleware(_Guard)])
    app.state.hub = Hub(registry, config)

    async def not_found(request: Request, exc: Exception) -> Response:
        if request.url.path.startswith("/api/"):
            return error_response(HubError("no such route", kind=ErrorKind.NOT_FOUND))
        return await web.not_found_page(request)

    app.add_exception_handler(404, not_found)
    return app
