"""The hub's edge: what every request meets before a route runs, and what every answer carries.

In order: the caller is authenticated from the `Authorization` header alone; a request with a body
(publish, yank, share) is refused before a byte of it is read unless it carries a token, refused on its
declared `Content-Length` when that is over the route's limit (413), and cut off at the limit when it
sends more than it declared or declares nothing (413), with a deadline for the whole body. Every answer,
errors and crashes included, carries the security headers; a crash is one log line and a JSON 500,
never a traceback to the client.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from adapterhub_lite.errors import AdapterHubError, ErrorKind, http_status
from adapterhub_lite.hub.tokens import HubError
from adapterhub_lite.registry import wire

SECURITY_HEADERS = {
    # No script runs on any page of the hub, whatever a card says: the pages use none.
    "content-security-policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
_RAW_SECURITY_HEADERS = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
BODY_DEADLINE_S = 30.0
_LOG = logging.getLogger("adapterhub.hub")
_DIGITS = re.compile(r"[0-9]{1,18}")


class TooLarge(HubError):
    """A request body over its route's limit (HTTP 413)."""


def error_response(exc: AdapterHubError) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["retry-after"] = str(max(1, round(exc.retry_after)))
    body = {"error": {"kind": str(exc.kind), "message": exc.message, "hint": exc.hint}}
    status = 413 if isinstance(exc, TooLarge) else http_status(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def declared_length(headers: Headers) -> int | None:
    """The request's `Content-Length`, or None; INVALID when it is not a plain decimal number."""
    raw = headers.get("content-length")
    if raw is None:
        return None
    if not _DIGITS.fullmatch(raw):
        raise HubError("bad Content-Length", kind=ErrorKind.INVALID)
    return int(raw)


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"request body over {limit // 1024} KiB", kind=ErrorKind.INVALID)


def bounded(receive: Receive, limit: int, deadline_s: float) -> Receive:
    """`receive` that raises TooLarge past `limit` body bytes and INVALID after `deadline_s` in all."""
    seen = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s

    async def wrapped() -> Message:
        nonlocal seen
        try:
            async with asyncio.timeout_at(end):
                message = await receive()
        except TimeoutError:
            raise HubError(
                f"request body not received within {deadline_s:g} s", kind=ErrorKind.INVALID
            ) from None
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
        return message

    return wrapped


class Guard:
    """ASGI middleware: authentication, body limits, security headers, no anonymous 500s."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *_RAW_SECURITY_HEADERS]}
            await send(message)

        try:
            hub: Any = scope["app"].state.hub
            headers = Headers(scope=scope)
            caller = hub.caller(headers.get("authorization"))
            scope.setdefault("state", {})
            scope["state"]["caller"] = caller
            if scope["path"] in wire.BODY_ROUTES and scope["method"] in ("POST", "PUT"):
                receive = _checked_body(scope["path"], headers, caller, receive)
            await self.app(scope, receive, send_with_headers)
        except AdapterHubError as exc:
            if not started:
                await error_response(exc)(scope, receive, send_with_headers)
        except Exception as exc:  # a bug or a fault below: one line in the log, a JSON 500 out
            _LOG.error(
                "hub: %s %s failed: %s: %s", scope.get("method"), scope.get("path"), type(exc).__name__, exc
            )
            if not started:
                err = HubError("the hub failed to answer this request", kind=ErrorKind.INTERNAL)
                await error_response(err)(scope, receive, send_with_headers)


def _checked_body(path: str, headers: Headers, caller: Any, receive: Receive) -> Receive:
    if caller.token is None:
        raise HubError(
            "this needs a token",
            hint="pass a publish token (ADAPTERHUB_TOKEN or `adapterhub login`)",
            kind=ErrorKind.UNAUTHENTICATED,
        )
    declared = declared_length(headers)
    if path == wire.PUBLISH.path:
        return receive  # an upload streams under its own size limit and deadlines (upload.Uploads)
    if declared is not None and declared > wire.MAX_BODY:
        raise _too_large(wire.MAX_BODY)
    return bounded(receive, wire.MAX_BODY, BODY_DEADLINE_S)
