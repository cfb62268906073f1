"""The admin routes under /adapterhub/v1/ (admin key only): status, evict, refresh."""

from __future__ import annotations

import json

from adapterhub_lite.errors import AdapterHubError
from adapterhub_lite.serving.gateway.admin_state import AdminState
from adapterhub_lite.serving.gateway.asgi import (
    BodyRefused,
    Receive,
    Scope,
    Send,
    read_body,
    send_error,
    send_json,
    send_project_error,
)
from adapterhub_lite.serving.gateway.rollout_admin import rollout_route
from adapterhub_lite.serving.gateway.usage_api import usage_route
from adapterhub_lite.vllm_compat.server import Engine

ADMIN_PREFIX = "/adapterhub/v1/"
_MAX_REQUEST_BYTES = 64 * 1024


async def admin_route(mw: AdminState, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one admin request."""
    if await rollout_route(mw, scope, receive, send):  # rollout routes (rollout_admin.py)
        return
    route = (scope["method"], scope["path"][len(ADMIN_PREFIX) :])
    engine = Engine.from_scope(scope)
    if route == ("GET", "status"):
        await send_json(
            send,
            200,
            {
                "loaded": engine.loaded() if engine is not None else [],
                "loading": sorted(mw.evictor.loading),
                "in_flight": dict(mw.evictor.in_flight),
                "capacity": mw.evictor.capacity,
                "idle_seconds": mw.evictor.idle_seconds,
                "cache": [p.name for p in mw.resolver.cache.entries()],
                "cache_bytes": mw.resolver.cache.total_bytes(),
                "cache_max_bytes": mw.resolver.cache.max_bytes,
                "handed_out": mw.resolver.handed_out(),  # folders given to vLLM, read not yet reported
                "prefetch": {
                    "pending": mw.prefetcher.pending(),
                    "fetched": list(mw.prefetcher.fetched),
                    "failed": [{"ref": ref, "error": why} for ref, why in mw.prefetcher.failed],
                },
                "tenants_version": mw.tenants_version,
                "ready": mw.ready,
            },
        )
    elif route == ("POST", "evict"):
        try:
            body = await read_body(receive, scope, limit=_MAX_REQUEST_BYTES)
            name = json.loads(body or b"{}")["adapter"]  # 64 KiB of JSON: a too-deep one is a RecursionError
            if not isinstance(name, str):
                raise TypeError
        except BodyRefused as exc:
            await send_error(send, exc.status, exc.message, "BadRequestError")
            return
        except (ValueError, KeyError, TypeError, RecursionError):
            await send_error(send, 400, 'body must be {"adapter": "<full reference>"}', "BadRequestError")
            return
        try:
            evicted = engine is not None and await mw.evictor.evict(engine, name)
        except AdapterHubError as exc:
            await send_project_error(send, exc, exc.message)
            return
        if not evicted:
            await send_error(send, 404, f"adapter {name} is not loaded", "NotFoundError")
            return
        mw.metrics.adapter_evictions.labels(mw.metrics.adapter(name)).inc()
        await send_json(send, 200, {"evicted": [name]})
    elif route == ("POST", "refresh"):
        await send_json(send, 200, {"tenants_version": mw.refresh(force=True)})
    elif route in (("GET", "usage"), ("GET", "usage/export")):  # the usage ledger (usage_api.py)
        await usage_route(mw.ledger.store if mw.ledger else None, route[1], scope, send)
    else:
        await send_error(send, 404, f"no admin route {scope['path']}", "NotFoundError")
