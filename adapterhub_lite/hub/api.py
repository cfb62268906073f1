"""The hub's HTTP API (`/api/v1/...`): the `Registry` interface over HTTP, one route per method.

Routes, parameters and bodies are the typed ones of `registry.wire`, validated by FastAPI before a route
runs (a bad one answers 422 `invalid`); the OpenAPI document is served at `wire.OPENAPI`. Every route
applies `access.Caller`'s rules and calls the registry in a worker thread (the registry is blocking I/O).
Errors answer JSON `{"error": {"kind", "message", "hint"}}` with the status `errors.http_status` gives.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.responses import FileResponse, JSONResponse, Response

from adapterhub_lite.bundles.manifest import BUNDLE_FILES, MANIFEST_FILE
from adapterhub_lite.bundles.signing import SIGNATURES_FILE
from adapterhub_lite.errors import ErrorKind
from adapterhub_lite.hub.access import Caller, not_found
from adapterhub_lite.hub.guard import declared_length
from adapterhub_lite.hub.tokens import HubError
from adapterhub_lite.registry import wire


class _BlobResponse(FileResponse):
    # Starlette reads 64 KiB per worker-thread hop by default; 4 MiB chunks keep large pulls near disk speed.
    chunk_size = 1 << 22


_SERVED_FILES = frozenset((*BUNDLE_FILES, MANIFEST_FILE, SIGNATURES_FILE))
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": wire.ErrorBody} for code in (401, 403, 404, 409, 413, 422, 429, 500, 503)
}
RefQ = Annotated[wire.Ref, Query(description="namespace/name@version, or namespace/name for the newest")]
NamespaceQ = Annotated[wire.Namespace, Query()]
TextQ = Annotated[wire.QueryText | None, Query()]

router = APIRouter(responses=_ERRORS)


def _hub(request: Request) -> Any:
    return request.app.state.hub


def _caller(request: Request) -> Caller:
    return request.state.caller


async def _readable(request: Request, ref: str) -> Any:
    """Resolve `ref` for the caller: the Published row, or the same 404 whether missing or not theirs."""
    hub, caller = _hub(request), _caller(request)
    hub.parse_ref(ref)  # a malformed name is INVALID for everyone (it cannot exist)
    found = await run_in_threadpool(caller.lookup, hub.registry, ref)
    if found is None:
        raise not_found(ref)
    return found


def _rows(rows: list) -> JSONResponse:
    return JSONResponse([p.to_dict() for p in rows])


@router.get(wire.HEALTH.path, response_model=wire.Health)
async def health() -> Response:
    return JSONResponse({"status": "ok"})


@router.get(wire.WHOAMI.path, response_model=wire.Whoami)
async def whoami(request: Request) -> Response:
    c = _caller(request)
    return JSONResponse({"namespace": c.namespace, "scope": c.token.scope if c.token else None})


_TAR_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}},
    }
}


@router.put(
    wire.PUBLISH.path,
    status_code=201,
    response_model=wire.VersionRow,
    openapi_extra=_TAR_BODY,
)
async def publish(request: Request) -> Response:
    """Upload a bundle archive (as `adapterhub pack --archive` writes it); the hub verifies and publishes."""
    hub, caller = _hub(request), _caller(request)
    if caller.token is None or caller.token.scope == "read":
        caller.require_write(hub.registry, caller.namespace or "")  # the right 401/403 before any upload
    declared = declared_length(request.headers)
    assert caller.token is not None
    with hub.uploads.slot(caller.token.id):
        try:
            staged = await hub.uploads.receive(request.stream(), declared)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; the temp file is already gone
        async with hub.publish_slots:
            published, _ = await run_in_threadpool(hub.publish_checked, caller, staged)
    return JSONResponse(published.to_dict(), status_code=201)


# POST takes the same upload (older clients sent POST); one operation in the OpenAPI document.
router.add_api_route(wire.PUBLISH.path, publish, methods=["POST"], status_code=201, include_in_schema=False)


@router.get(wire.RESOLVE.path, response_model=wire.VersionRow)
async def resolve(request: Request, ref: RefQ) -> Response:
    p = await _readable(request, ref)
    return JSONResponse(p.to_dict())


@router.get(wire.FILES.path, response_model=wire.FileListing)
async def files(request: Request, ref: RefQ) -> Response:
    """The files of a version with their sizes and sha256 (manifest and signatures included)."""
    hub = _hub(request)
    p = await _readable(request, ref)
    lease = await run_in_threadpool(hub.bundle, p)
    d = lease.path

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

    try:
        return JSONResponse({"ref": p.ref, "digest": p.digest, "files": await run_in_threadpool(listing)})
    finally:
        hub.cache.release(lease)


@router.get(
    wire.FILE.path,
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string"}}}}},
)
async def file(
    request: Request,
    namespace: Annotated[wire.Namespace, Path()],
    name: Annotated[wire.Name, Path()],
    version: Annotated[wire.Version, Path()],
    file: Annotated[str, Path(max_length=64)],
) -> Response:
    """One file of a version; HTTP Range is honoured, so an interrupted download resumes."""
    hub = _hub(request)
    ref = f"{namespace}/{name}@{version}"
    p = await _readable(request, ref)
    if file not in _SERVED_FILES:
        raise not_found(f"{ref}:{file}")
    lease = await run_in_threadpool(hub.bundle, p)
    if not (lease.path / file).is_file():
        hub.cache.release(lease)
        raise not_found(f"{ref}:{file}")
    return _BlobResponse(  # the copy stays leased until the last byte is sent
        lease.path / file,
        media_type="application/octet-stream",
        filename=file,
        background=BackgroundTask(hub.cache.release, lease),
    )


@router.get(
    wire.MANIFEST.path,
    response_class=Response,
    responses={200: {"content": {"application/json": {"schema": {"type": "object"}}}}},
)
async def manifest(request: Request, ref: RefQ) -> Response:
    hub = _hub(request)
    p = await _readable(request, ref)
    lease = await run_in_threadpool(hub.bundle, p)
    try:
        return Response((lease.path / MANIFEST_FILE).read_bytes(), media_type="application/json")
    finally:
        hub.cache.release(lease)


@router.get(wire.SEARCH.path, response_model=list[wire.VersionRow])
async def search(
    request: Request,
    q: Annotated[wire.QueryText, Query()] = "",
    base: TextQ = None,
    tag: TextQ = None,
    limit: Annotated[int, Query(ge=1, le=wire.MAX_RESULTS)] = wire.MAX_RESULTS,
    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
) -> Response:
    """Matches as a JSON list, one page of them (`limit`, `offset`); `x-total-count` says how many."""
    hub, caller = _hub(request), _caller(request)
    if caller.token is None:  # in memory only: no worker thread needed
        rows, total = hub.search(caller, q, base, tag, limit, offset)
    else:  # a token's view asks the registry what is shared with it
        rows, total = await run_in_threadpool(hub.search, caller, q, base, tag, limit, offset)
    body = b"[" + b",".join(hub.catalog.as_json(p) for p in rows) + b"]"
    return Response(body, media_type="application/json", headers={"x-total-count": str(total)})


@router.get(wire.VERSIONS.path, response_model=list[wire.VersionRow])
async def versions(request: Request, namespace: Annotated[wire.Namespace | None, Query()] = None) -> Response:
    hub, caller = _hub(request), _caller(request)
    return _rows(await run_in_threadpool(lambda: caller.visible(hub.registry, hub.versions(namespace))))


@router.get(wire.NAMESPACES.path, response_model=list[wire.Namespace])
async def namespaces(request: Request) -> Response:
    hub, caller = _hub(request), _caller(request)
    rows = await run_in_threadpool(lambda: caller.visible(hub.registry, hub.versions(None)))
    return JSONResponse(sorted({p.namespace for p in rows}))


@router.post(wire.YANK.path, response_model=wire.VersionRow)
async def yank(request: Request, body: wire.YankRequest) -> Response:
    hub, caller = _hub(request), _caller(request)

    def go() -> Any:
        r = hub.parse_ref(body.ref)
        caller.require_write(hub.registry, r.namespace, body.ref)
        p = hub.registry.yank(body.ref, reason=body.reason, undo=body.undo)
        hub.catalog.refresh()
        return p

    return JSONResponse((await run_in_threadpool(go)).to_dict())


@router.post(wire.SHARE.path, response_model=wire.Shared)
async def share(request: Request, body: wire.ShareRequest) -> Response:
    hub, caller = _hub(request), _caller(request)

    def go() -> dict[str, Any]:
        r = hub.parse_ref(body.ref)
        caller.require_write(hub.registry, r.namespace, body.ref)
        if body.public is not None:
            hub.registry.set_public(body.ref, body.public)
        if body.with_ is not None:
            hub.registry.share(body.ref, body.with_, revoke=body.revoke)
        hub.catalog.refresh()
        return {"ref": body.ref, "shared_with": hub.registry.shared_with(body.ref)}

    return JSONResponse(await run_in_threadpool(go))


@router.get(wire.SHARED_WITH.path, response_model=list[wire.Namespace])
async def shared_with(request: Request, ref: RefQ) -> Response:
    hub, caller = _hub(request), _caller(request)
    await _readable(request, ref)
    r = hub.parse_ref(ref)
    if not caller.admin and caller.namespace != r.namespace:
        return JSONResponse([])  # who else may read it is the owner's business
    return JSONResponse(await run_in_threadpool(hub.registry.shared_with, ref))


@router.get(wire.READABLE.path, response_model=list[wire.VersionRow])
async def readable(request: Request, namespace: NamespaceQ, base: TextQ = None) -> Response:
    """What `namespace` may read (the serving plugin's /v1/models): asked by its own tokens or an admin."""
    hub, caller = _hub(request), _caller(request)
    caller.require_own(namespace)
    return _rows(await run_in_threadpool(hub.registry.readable, namespace, base))


@router.get(wire.CAN_READ.path, response_model=wire.Readable)
async def can_read(request: Request, namespace: NamespaceQ, ref: RefQ) -> Response:
    hub, caller = _hub(request), _caller(request)
    caller.require_own(namespace)
    hub.parse_ref(ref)

    def go() -> bool:
        if caller.admin:  # the namespace's view, not the admin's
            return bool(hub.registry.can_read(namespace, ref))
        return caller.can_read(hub.registry, ref)

    return JSONResponse({"readable": await run_in_threadpool(go)})


def unknown_route() -> HubError:
    return HubError("no such route", kind=ErrorKind.NOT_FOUND)
