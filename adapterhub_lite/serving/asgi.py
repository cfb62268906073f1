"""ASGI plumbing shared by the middleware's parts: types, the bearer key, bodies, OpenAI-shaped answers."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from adapterhub_lite.errors import AdapterHubError, ErrorKind, http_status

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

MAX_BODY_BYTES = 8 * 1024 * 1024
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
    """The key of an `Authorization: Bearer <key>` header, or None."""
    for k, v in scope["headers"]:
        if k == b"authorization":
            value = v.decode("latin-1")
            if value[:7].lower() == "bearer " and value[7:].strip():
                return value[7:].strip()
    return None


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None when it is over MAX_BODY_BYTES."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
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
