"""Requests sent straight into a `TenancyMiddleware` (no HTTP server), for tests that put the gateway in
front of a stand-in for vLLM and read what it answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any


def asker(mw: Any, key: str, model: str = "base") -> Callable[[], Awaitable[tuple[int, dict]]]:
    """An async function that sends one completion request with `key` and returns (status, headers)."""
    request = json.dumps({"model": model, "prompt": "x", "max_tokens": 1}).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/completions",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
    }

    async def ask() -> tuple[int, dict]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": request, "more_body": False}

        async def send(message):
            sent.append(message)

        await mw(scope, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"])

    return ask


def call(
    mw: Any,
    path: str,
    *,
    key: str | None = None,
    body: bytes = b"",
    method: str = "POST",
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
    **scope_extra: Any,
) -> list[dict]:
    """Send one request into `mw` on a fresh event loop and return the ASGI messages it sent; the
    gateway's background tasks (sweeper, alias watcher, schedulers) end with the loop."""
    sent: list[dict] = []
    all_headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    all_headers += headers or []
    scope = {
        "type": "http", "method": method, "path": path, "headers": all_headers, "query_string": query,
        **scope_extra,
    }  # fmt: skip

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(mw(scope, receive, send))  # asyncio.run cancels the tasks the request started
    return sent


def status_and_body(sent: list[dict]) -> tuple[int, bytes]:
    """The status and the whole body of what `call` returned."""
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])
