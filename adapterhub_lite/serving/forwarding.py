"""Pass a rewritten request on to vLLM and count what comes back (status, tokens) without changing it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from adapterhub_lite.serving.asgi import App, Message, Receive, Scope, Send, replay_body
from adapterhub_lite.serving.metrics import ServingMetrics
from adapterhub_lite.serving.usage import UsageMeter, without_usage_event


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

    async def inner_send(message: Message) -> None:
        usage.observe(message)
        if hide_usage and usage.streaming and message["type"] == "http.response.body":
            message = {**message, "body": without_usage_event(message.get("body", b""))}
        await send(message)

    try:
        await app(inner_scope, inner_receive, inner_send)
    finally:
        status = usage.status or 500
        adapter_label = metrics.adapter(adapter_label)
        metrics.requests.labels(tenant_label, adapter_label, str(status)).inc()
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
