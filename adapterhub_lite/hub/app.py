"""The hub's ASGI app (`create_app`): the typed API (FastAPI) and the web catalog behind one guard.

The service object every route shares is `service.Hub`; the edge every request meets first is
`guard.Guard`; the routes are `api` (JSON, described by the OpenAPI document at `wire.OPENAPI`) and
`web` (server-rendered pages).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from adapterhub_lite.errors import AdapterHubError, ErrorKind
from adapterhub_lite.hub.guard import SECURITY_HEADERS, Guard, error_response
from adapterhub_lite.hub.service import Hub, HubConfig, state_dir_for
from adapterhub_lite.hub.tokens import HubError
from adapterhub_lite.registry import wire

__all__ = ["SECURITY_HEADERS", "Hub", "HubConfig", "create_app", "error_response", "state_dir_for"]


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    msg = str(first.get("msg", "invalid"))
    if first.get("type") == "string_pattern_mismatch":  # the pattern means nothing to a reader
        msg = f"{str(first.get('input'))[:80]!r} is not a valid {where.rsplit('.', 1)[-1]}"
    return f"{where}: {msg}{more}"[:500]


def create_app(registry: Any, config: HubConfig) -> FastAPI:
    """The hub's ASGI app over `registry` (any object with the `Registry` interface)."""
    from adapterhub_lite.hub import api, web

    app = FastAPI(
        title="adapterhub hub",
        version=wire.API.rsplit("/", 1)[-1],
        openapi_url=wire.OPENAPI.path,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # a redirect would be built from the Host header the client chose
        middleware=[Middleware(Guard)],
    )
    app.include_router(api.router)
    app.router.routes.extend(web.routes())
    app.state.hub = Hub(registry, config)

    async def invalid(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(HubError(_validation_message(exc), kind=ErrorKind.INVALID))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if isinstance(exc.__cause__, AdapterHubError):  # raised while FastAPI read the body (guard limits)
            return error_response(exc.__cause__)
        if exc.status_code == 404:
            if request.url.path.startswith(wire.API + "/"):
                return error_response(api.unknown_route())
            return await web.not_found_page(request)
        if exc.status_code == 400:  # FastAPI could not parse the body (not JSON, nested too deep)
            return error_response(HubError("request body is not valid JSON", kind=ErrorKind.INVALID))
        body = {"error": {"kind": "invalid", "message": str(exc.detail)[:200], "hint": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def project_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, AdapterHubError)
        return error_response(exc)

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(AdapterHubError, project_error)
    return app
