"""A completion request sent straight into a `TenancyMiddleware` (no HTTP server), for tests that put
the gateway in front of a stand-in for vLLM and read its status and headers."""

from __future__ import annotations

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
