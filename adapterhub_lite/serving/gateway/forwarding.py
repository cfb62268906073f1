"""Pass a rewritten request on to vLLM and count what comes back (status, tokens).

The answer goes back unchanged, with one exception: a server error from vLLM (its engine stopping or
dead, a request aborted by a stop) reaches the client as a 503 with Retry-After, never a 500: the
request did nothing wrong, and a client or load balancer should retry it, on this server or another.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from adapterhub_lite.serving.gateway.asgi import App, Message, Receive, Scope, Send, replay_body, send_error
from adapterhub_lite.serving.gateway.metrics import ServingMetrics
from adapterhub_lite.serving.gateway.usage import UsageMeter, without_usage_event

UNAVAILABLE_MESSAGE = "the model server is stopping or its engine failed; retry shortly"
_RETRY_AFTER_S = b"2"
_REPLACED = frozenset(range(500, 600)) - {503}  # vLLM's own 503 (a full queue) already says "retry"
logger = logging.getLogger("adapterhub.serving")


async def forward(
    app: App,
    scope: Scope,
    receive: Receive,
    send: Send,
    body: bytes,
    *,
    metrics: ServingMetrics,
    tenant_label: str,
    adapter_label: str,
    hide_usage: bool = False,
    on_done: Callable[[int, int, int], None] | None = None,
) -> tuple[int, int]:
    """Send `body` (the rewritten JSON) to `app` in place of the client's; the response, streaming or
    not, goes back untouched (except the usage event the middleware asked for itself when `hide_usage`).

    Returns (prompt tokens, completion tokens) for rate limiting; metrics are counted here, and
    `on_done(status, prompt, completion)` (the usage ledger) is told, even when the client went away.
    """
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-length", b"authorization")]
    headers.append((b"content-length", str(len(body)).encode()))
    inner_scope = dict(scope, headers=headers)
    inner_receive = replay_body(body, receive)  # a client going away still reaches vLLM

    usage = UsageMeter()
    began = time.monotonic()
    started = False
    replaced = False  # vLLM's 5xx answer is being swallowed; a 503 goes out at its end

    async def inner_send(message: Message) -> None:
        nonlocal started, replaced
        if message["type"] == "http.response.start" and message.get("status", 200) in _REPLACED:
            replaced = True
            return
        if replaced:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await unavailable()
            return
        started = started or message["type"] == "http.response.start"
        usage.observe(message)
        if hide_usage and usage.streaming and message["type"] == "http.response.body":
            message = {**message, "body": without_usage_event(message.get("body", b""))}
        await send(message)

    async def unavailable() -> None:
        nonlocal started
        started = True
        usage.observe({"type": "http.response.start", "status": 503, "headers": []})
        await send_error(
            send,
            503,
            UNAVAILABLE_MESSAGE,
            "ServiceUnavailableError",
            None,
            [(b"retry-after", _RETRY_AFTER_S)],
        )

    try:
        try:
            await app(inner_scope, inner_receive, inner_send)
        except Exception as exc:
            # vLLM let an error escape (its engine died under the request): above us only a 500 waits
            if started:
                raise
            logger.warning("adapterhub: vLLM failed a request (%s); answered 503", type(exc).__name__)
            await unavailable()
    finally:
        status = usage.status or 503
        adapter_label = metrics.adapter(adapter_label)
        metrics.requests.labels(tenant_label, adapter_label, str(status)).inc()
        metrics.request_seconds.labels(tenant_label).observe(time.monotonic() - began)
        if status >= 400:
            metrics.errors.labels(tenant_label, adapter_label, f"http_{status}").inc()
        prompt, completion = usage.tokens()
        metrics.prompt_tokens.labels(tenant_label, adapter_label).inc(prompt)
        metrics.completion_tokens.labels(tenant_label, adapter_label).inc(completion)
        if on_done is not None:
            on_done(status, prompt, completion)
    return prompt, completion


def scope_for(path: str, body: bytes, base: Scope | None = None) -> dict[str, Any]:
    """A POST scope for `path` carrying JSON `body` (internal calls into vLLM's own routes)."""
    scope: dict[str, Any] = dict(base or {})
    scope.update(
        type="http",
        http_version="1.1",
        method="POST",
        scheme="http",
        path=path,
        raw_path=path.encode(),
        query_string=b"",
        root_path="",
        headers=[(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    )
    scope.setdefault("client", ("127.0.0.1", 0))
    scope.setdefault("server", ("127.0.0.1", 0))
    return scope
