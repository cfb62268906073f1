"""The hub's HTTP API (`/api/v1/...`): the `Registry` interface over HTTP, one route per method.

Every route authenticates the caller, applies `access.Caller`'s rules, and calls the registry in a worker
thread (the registry is blocking I/O). Errors answer JSON `{"error": {"kind", "message", "hint"}}` with
the status `errors.http_status` gives their kind.
"""

from __future__ import annotations

import hashlib
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from adapterhub_lite.bundles.manifest import BUNDLE_FILES, MANIFEST_FILE
from adapterhub_lite.bundles.naming import check_name
from adapterhub_lite.bundles.signing import SIGNATURES_FILE
from adapterhub_lite.errors import ErrorKind, RegistryError
from adapterhub_lite.hub.access import Caller, not_found
from adapterhub_lite.hub.app import MAX_RESULTS
from adapterhub_lite.hub.tokens import HubError


class _BlobResponse(FileResponse):
    # Starlette reads 64 KiB per worker-thread hop by default; 4 MiB chunks keep large pulls near disk speed.
    chunk_size = 1 << 22


_SERVED_FILES = frozenset((*BUNDLE_FILES, MANIFEST_FILE, SIGNATURES_FILE))
_MAX_QUERY = 200


def _hub(request: Request) -> Any:
    return request.app.state.hub


def _param(request: Request, name: str, required: bool = False) -> str | None:
    value = request.query_params.get(name)
    if value is None and required:
        raise HubError(f"missing query parameter {name!r}", kind=ErrorKind.INVALID)
    if value is not None and (len(value) > _MAX_QUERY or any(ord(c) < 32 or c == "\x7f" for c in value)):
        raise HubError(
            f"query parameter {name!r}: too long or holds control characters", kind=ErrorKind.INVALID
        )
    return value


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > 64 * 1024:
        raise HubError("request body over 64 KiB", kind=ErrorKind.INVALID)
    try:
        import json

        data = json.loads(raw or b"{}")
    except ValueError:
        raise HubError("request body is not JSON", kind=ErrorKind.INVALID) from None
    if not isinstance(data, dict):
        raise HubError("request body must be a JSON object", kind=ErrorKind.INVALID)
    return data


def _str(data: dict[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise HubError(f"field {key!r} must be a string", kind=ErrorKind.INVALID)
    return value


async def _readable(request: Request, ref: str) -> Any:
    """Resolve `ref` for the caller: the Published row, or the same 404 whether missing or not theirs."""
    hub, caller = _hub(request), request.state.caller
    hub.parse_ref(ref)  # a malformed name is INVALID for everyone (it cannot exist)

    def go() -> Any:
        if not caller.can_read(hub.registry, ref):
            raise not_found(ref)
        try:
            return hub.registry.resolve(ref)
        except RegistryError as exc:
            if exc.kind == ErrorKind.NOT_FOUND:
                raise not_found(ref) from None
            raise

    return await run_in_threadpool(go)


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def whoami(request: Request) -> Response:
    c: Caller = request.state.caller
    return JSONResponse({"namespace": c.namespace, "scope": c.token.scope if c.token else None})


async def publish(request: Request) -> Response:
    hub, caller = _hub(request), request.state.caller
    if caller.token is None or caller.token.scope == "read":
        caller.require_write(hub.registry, caller.namespace or "")  # the right 401/403 before any upload
    declared = request.headers.get("content-length")
    try:
        staged = await hub.uploads.receive(request.stream(), int(declared) if declared else None)
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is listening; the temp file is already gone
    except ValueError:
        raise HubError("bad Content-Length", kind=ErrorKind.INVALID) from None
    async with hub.publish_slots:
        published, bundle = await run_in_threadpool(hub.publish_checked, caller, staged)
    return JSONResponse(published.to_dict(), status_code=201)


async def resolve(request: Request) -> Response:
    p = await _readable(request, _param(request, "ref", True))
    return JSONResponse(p.to_dict())


async def files(request: Request) -> Response:
    """The files of a version with their sizes and sha256 (manifest and signatures included)."""
    hub = _hub(request)
    p = await _readable(request, _param(request, "ref", True))
    d = await run_in_threadpool(hub.cache.get, hub.registry, p.ref, p.digest)

    def listing() -> list[dict[str, Any]]:
        out = []
        m = hub.manifest_of(p.ref, d)
        for f in m.files:
            out.append({"path": f.path, "size": f.size, "sha256": f.sha256})
        for name in (MANIFEST_FILE, SIGNATURES_FILE):
            path = d / name
            if path.is_file():
                data = path.read_bytes()
                out.append({"path": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        return out

    return JSONResponse({"ref": p.ref, "digest": p.digest, "files": await run_in_threadpool(listing)})


async def file(request: Request) -> Response:
    """One file of a version; HTTP Range is honoured, so an interrupted download resumes."""
    hub = _hub(request)
    ns, name, version = (request.path_params[k] for k in ("namespace", "name", "version"))
    fname = request.path_params["file"]
    ref = f"{ns}/{name}@{version}"
    p = await _readable(request, ref)
    if fname not in _SERVED_FILES:
        raise not_found(f"{ref}:{fname}")
    d = await run_in_threadpool(hub.cache.get, hub.registry, p.ref, p.digest)
    if not (d / fname).is_file():
        raise not_found(f"{ref}:{fname}")
    return _BlobResponse(d / fname, media_type="application/octet-stream", filename=fname)


async def manifest(request: Request) -> Response:
    hub = _hub(request)
    p = await _readable(request, _param(request, "ref", True))
    d = await run_in_threadpool(hub.cache.get, hub.registry, p.ref, p.digest)
    return Response((d / MANIFEST_FILE).read_bytes(), media_type="application/json")


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = _param(request, name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise HubError(
            f"query parameter {name!r} must be an integer from {low} to {high}", kind=ErrorKind.INVALID
        )
    return int(raw)


async def search(request: Request) -> Response:
    """Matches as a JSON list, one page of them (`limit`, `offset`); `x-total-count` says how many."""
    hub, caller = _hub(request), request.state.caller
    q, base, tag = _param(request, "q") or "", _param(request, "base"), _param(request, "tag")
    limit = _int_param(request, "limit", MAX_RESULTS, 1, MAX_RESULTS)
    offset = _int_param(request, "offset", 0, 0, 10**9)
    if caller.token is None:  # in memory only: no worker thread needed
        rows, total = hub.search(caller, q, base, tag, limit, offset)
    else:  # a token's view may ask the registry about shares
        rows, total = await run_in_threadpool(hub.search, caller, q, base, tag, limit, offset)
    body = b"[" + b",".join(hub.catalog.as_json(p) for p in rows) + b"]"
    return Response(body, media_type="application/json", headers={"x-total-count": str(total)})


async def versions(request: Request) -> Response:
    hub, caller = _hub(request), request.state.caller
    ns = _param(request, "namespace")
    if ns:
        check_name(ns, "namespace", HubError)
    rows = await run_in_threadpool(lambda: caller.visible(hub.registry, hub.versions(ns)))
    return JSONResponse([p.to_dict() for p in rows])


async def namespaces(request: Request) -> Response:
    hub, caller = _hub(request), request.state.caller
    rows = await run_in_threadpool(lambda: caller.visible(hub.registry, hub.versions(None)))
    return JSONResponse(sorted({p.namespace for p in rows}))


async def yank(request: Request) -> Response:
    hub, caller = _hub(request), request.state.caller
    data = await _body(request)
    ref = _str(data, "ref")
    undo = bool(data.get("undo", False))

    def go() -> Any:
        r = hub.parse_ref(ref)
        caller.require_write(hub.registry, r.namespace, ref)
        p = hub.registry.yank(ref, reason=_str(data, "reason", ""), undo=undo)
        hub.catalog.refresh()
        return p

    return JSONResponse((await run_in_threadpool(go)).to_dict())


async def share(request: Request) -> Response:
    hub, caller = _hub(request), request.state.caller
    data = await _body(request)
    ref = _str(data, "ref")

    def go() -> dict[str, Any]:
        r = hub.parse_ref(ref)
        caller.require_write(hub.registry, r.namespace, ref)
        if "public" in data:
            hub.registry.set_public(ref, bool(data["public"]))
        if data.get("with") is not None:
            hub.registry.share(ref, _str(data, "with"), revoke=bool(data.get("revoke", False)))
        hub.catalog.refresh()
        return {"ref": ref, "shared_with": hub.registry.shared_with(ref)}

    return JSONResponse(await run_in_threadpool(go))


async def shared_with(request: Request) -> Response:
    hub, caller = _hub(request), request.state.caller
    ref = _param(request, "ref", True)
    await _readable(request, ref)
    r = hub.parse_ref(ref)
    if not caller.admin and caller.namespace != r.namespace:
        return JSONResponse([])  # who else may read it is the owner's business
    return JSONResponse(await run_in_threadpool(hub.registry.shared_with, ref))


async def readable(request: Request) -> Response:
    """What `namespace` may read, as far as this caller may see (the serving plugin's /v1/models)."""
    hub, caller = _hub(request), request.state.caller
    ns = _param(request, "namespace", True)
    check_name(ns, "namespace", HubError)
    base = _param(request, "base")
    rows = await run_in_threadpool(lambda: caller.visible(hub.registry, hub.registry.readable(ns, base)))
    return JSONResponse([p.to_dict() for p in rows])


async def can_read(request: Request) -> Response:
    hub, caller = _hub(request), request.state.caller
    ns, ref = _param(request, "namespace", True), _param(request, "ref", True)

    def go() -> bool:
        return caller.can_read(hub.registry, ref) and bool(hub.registry.can_read(ns, ref))

    return JSONResponse({"readable": await run_in_threadpool(go)})


ROUTES = [
    Route("/health", health),
    Route("/api/v1/whoami", whoami),
    Route("/api/v1/publish", publish, methods=["PUT", "POST"]),
    Route("/api/v1/resolve", resolve),
    Route("/api/v1/files", files),
    Route("/api/v1/file/{namespace}/{name}/{version}/{file}", file),
    Route("/api/v1/manifest", manifest),
    Route("/api/v1/search", search),
    Route("/api/v1/versions", versions),
    Route("/api/v1/namespaces", namespaces),
    Route("/api/v1/yank", yank, methods=["POST"]),
    Route("/api/v1/share", share, methods=["POST"]),
    Route("/api/v1/shared-with", shared_with),
    Route("/api/v1/readable", readable),
    Route("/api/v1/can-read", can_read),
]
