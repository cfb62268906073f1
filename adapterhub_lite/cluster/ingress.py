"""The HTTP front of the cluster: routes each request to a replica that already holds its adapter.

The ingress reads the request's `model` and API key only to compute the affinity key (the immutable
reference, see `affinity`); it authorizes nothing — every replica's tenancy layer does that. A request
that fails before its first byte reached the client (its replica died, or was replaced) is retried once
on another replica when it is not a stream; otherwise it ends with a clean 503 (or, for a stream that
already started, an OpenAI-style error event), never another adapter's answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from adapterhub_lite.cluster.affinity import MAX_BODY_BYTES, AffinityKeyer
from adapterhub_lite.cluster.ray_compat import keep_replica_grpc_on_loopback
from adapterhub_lite.cluster.replica import error_body

log = logging.getLogger(__name__)
_JSON = [("content-type", "application/json")]


def wants_stream(body: bytes) -> bool:
    """Whether an OpenAI request body asks for a stream."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("stream") is True


class IngressServer:
    """The ingress's body (Ray wraps it with `serve.deployment` in `launch`)."""

    def __init__(
        self, replicas: Any, keyer_factory: Any, affinity: bool = True, loopback: bool = False
    ) -> None:
        if loopback:
            keep_replica_grpc_on_loopback()
        self.replicas = replicas
        self.affinity = affinity
        self.keyer: AffinityKeyer | None = keyer_factory() if affinity else None

    def _route(self, key: str | None) -> Any:
        if key:
            return self.replicas.options(stream=True, multiplexed_model_id=key)
        return self.replicas.options(stream=True)

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response, StreamingResponse

        declared = request.headers.get("content-length")
        # isascii: "²".isdigit() is true and int() refuses it.
        if declared and not (declared.isascii() and declared.isdigit()):
            return Response(error_body(400, "malformed Content-Length"), 400, headers=dict(_JSON))
        if declared and int(declared) > MAX_BODY_BYTES:
            return Response(error_body(413, "request body too large"), 413, headers=dict(_JSON))
        chunks, size = [], 0
        async for chunk in request.stream():  # stops at the limit: a body without a length is bounded too
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                return Response(error_body(413, "request body too large"), 413, headers=dict(_JSON))
            chunks.append(chunk)
        body = b"".join(chunks)
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        headers = list(request.headers.items())
        key = None
        if self.keyer is not None:
            try:
                key = self.keyer.key(request.url.path, request.headers.get("authorization"), body)
            except Exception as exc:  # the store is down: route without affinity, the replica decides
                log.warning("affinity key unavailable (%s); routing without affinity", type(exc).__name__)
        stream = wants_stream(body)
        attempts = 1 if stream else 2
        for attempt in range(attempts):
            chunks = self._route(key).forward.remote(request.method, path, headers, body)
            try:
                status, out_headers = await chunks.__anext__()
                if stream:
                    return StreamingResponse(_relay(chunks), status_code=status, headers=dict(out_headers))
                content = b"".join([chunk async for chunk in chunks])
            except Exception as exc:  # the replica died or was replaced mid-request
                name = type(exc).__name__
                log.warning("replica failed (%s), attempt %d of %d", name, attempt + 1, attempts)
                continue
            return Response(content, status_code=status, headers=dict(out_headers))
        return Response(
            error_body(503, "no replica could serve the request; retry"),
            503,
            headers={**dict(_JSON), "retry-after": "5"},
        )


async def _relay(chunks: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:
        log.warning("replica failed mid-stream (%s)", type(exc).__name__)
        event = {"error": {"message": "the replica serving this stream failed; retry", "code": 503}}
        yield b"data: " + json.dumps(event).encode() + b"\n\n"
