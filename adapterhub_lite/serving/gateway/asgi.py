"""ASGI plumbing shared by the middleware's parts: types, the bearer key, bodies, OpenAI-shaped answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from adapterhub_lite import keys
from adapterhub_lite.errors import AdapterHubError, ErrorKind, http_status

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 8 * 1024 * 1024
# The whole body must arrive within this: a slow client holds a connection and a worker task for at
# most this long. 8 MiB at 30 s is ~280 KB/s, far below any link a real client uses.
BODY_DEADLINE_S = 30.0
# Retry-After for an "unavailable" answer whose error did not say when (a locked index, a full cache).
DEFAULT_RETRY_AFTER_S = 5

# The OpenAI error `type` for each kind, as official clients and vLLM itself name them.
_ERROR_TYPES = {
    ErrorKind.INVALID: "BadRequestError",
    ErrorKind.NOT_FOUND: "NotFoundError",
    ErrorKind.CONFLICT: "ConflictError",
    ErrorKind.UNAUTHENTICATED: "AuthenticationError",
    ErrorKind.FORBIDDEN: "PermissionDeniedError",
    ErrorKind.LIMITED: "RateLimitError",
    ErrorKind.UNAVAILABLE: "ServiceUnavailableError",
    ErrorKind.INTERNAL: "InternalServerError",
}


def bearer(scope: Scope) -> str | None:
    """The key of an `Authorization: Bearer <key>` header, or None (`adapterhub_lite.keys.bearer`)."""
    for k, v in scope["headers"]:
        if k == b"authorization":
            return keys.bearer(v)
    return None


class BodyRefused(Exception):
    """A request body that is not read (on): `status` (400, 408, 413) and a one-line `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length, None when it sends none; a malformed one is refused (400)."""
    for k, v in scope.get("headers", []):
        if k == b"content-length":
            text = v.decode("latin-1").strip()
            if not (text.isascii() and text.isdigit()) or len(text) > 18:
                raise BodyRefused(400, "malformed Content-Length header")
            return int(text)
    return None


async def read_body(
    receive: Receive,
    scope: Scope | None = None,
    limit: int = MAX_BODY_BYTES,
    deadline_s: float | None = None,
) -> bytes:
    """The whole request body, bounded in size and time; call it only after authenticating.

    A Content-Length over `limit` is refused before one byte is read, a body that grows past it is
    refused at the limit (both 413), and a body still incomplete after `deadline_s` (a client
    trickling bytes to hold a connection) is refused with 408 (default: BODY_DEADLINE_S): BodyRefused.
    """
    if scope is not None:
        declared = declared_length(scope)
        if declared is not None and declared > limit:
            raise BodyRefused(413, f"request body of {declared} bytes is over the {limit}-byte limit")
    deadline_s = BODY_DEADLINE_S if deadline_s is None else deadline_s
    chunks, size = [], 0
    try:
        async with asyncio.timeout(deadline_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise BodyRefused(413, f"request body over the {limit}-byte limit")
                chunks.append(chunk)
                if not message.get("more_body"):
                    break
    except TimeoutError:
        raise BodyRefused(408, f"request body not received within {deadline_s:g} s") from None
    return b"".join(chunks)


def replay_body(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the already-read `body` once, then the client's own messages (a disconnect
    must still reach the app: vLLM cancels generation on it)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def send_json(
    send: Send, status: int, data: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(data).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    status: int,
    message: str,
    err_type: str,
    param: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """An error in the OpenAI shape, as vLLM answers, so official clients raise the usual exceptions."""
    await send_json(
        send,
        status,
        {"error": {"message": message, "type": err_type, "param": param, "code": status}},
        headers,
    )


async def send_project_error(
    send: Send, exc: AdapterHubError, message: str, param: str | None = None, err_type: str | None = None
) -> int:
    """Answer with `exc`'s kind (status, OpenAI error type, Retry-After); returns the status sent."""
    status = http_status(exc)
    headers = []
    retry = exc.retry_after
    if retry is None and exc.kind in (ErrorKind.UNAVAILABLE, ErrorKind.LIMITED):
        retry = DEFAULT_RETRY_AFTER_S
    if retry is not None:
        headers.append((b"retry-after", str(max(1, int(retry + 0.999))).encode()))
    await send_error(send, status, message, err_type or _ERROR_TYPES[exc.kind], param, headers)
    return status
