"""How the hub meets the network: uvicorn with limits that a slow or silent client cannot turn into an
off switch.

uvicorn's own `limit_concurrency` counts open connections, and nothing in it closes a connection that
never finishes its request headers: 256 silent sockets answered 503 to everyone. Here every connection
has `header_timeout_s` to deliver each request's headers (whatever it sends meanwhile), the headers are
bounded in size (`MAX_HEADER_BYTES`; httptools has no bound of its own, a 30 MiB header was answered),
one client address holds at most `per_client` connections at once (more are closed on arrival), and
idle keep-alive connections close after `keep_alive_s`. Bodies have their own deadlines (`guard`,
`upload`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from adapterhub_lite.registry.credentials import is_loopback_host

MAX_HEADER_BYTES = 32 * 1024


@dataclass(frozen=True)
class Limits:
    """The connection limits of one hub server."""

    header_timeout_s: float = 10.0
    per_client: int = 32
    keep_alive_s: float = 5.0
    max_connections: int = 1024


class _Guarded:
    """What both of uvicorn's HTTP protocols get: a deadline for request headers, a bound on their size,
    and a cap per client address. Mixed in before the protocol class."""

    limits: Limits = Limits()

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._counted = False
        self._header_timer: asyncio.TimerHandle | None = None
        counts = _counts(self.server_state)  # type: ignore[attr-defined]
        self._peer = self.client[0] if self.client else ""  # type: ignore[attr-defined]
        if counts[self._peer] >= self.limits.per_client:
            transport.abort()  # refused on arrival: no slot, no buffer, no task
            return
        counts[self._peer] += 1
        self._counted = True
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if getattr(self, "_counted", False):
            counts = _counts(self.server_state)  # type: ignore[attr-defined]
            counts[self._peer] -= 1
            if counts[self._peer] <= 0:
                del counts[self._peer]
            self._counted = False
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        # Still waiting for the end of the headers after parsing this: every byte of it was headers.
        if getattr(self, "_pending", False):
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:  # headers that never end (httptools has no bound)
                self.transport.abort()  # type: ignore[attr-defined]

    def on_response_complete(self) -> None:
        # Armed before the protocol handles a pipelined request, whose headers then disarm it.
        self._await_headers()
        super().on_response_complete()  # type: ignore[misc]

    def _headers_done(self) -> None:
        self._pending = False
        self._disarm()

    def _await_headers(self) -> None:
        self._disarm()
        self._pending, self._header_bytes = True, 0
        loop = self.loop  # type: ignore[attr-defined]
        self._header_timer = loop.call_later(self.limits.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        transport = self.transport  # type: ignore[attr-defined]
        if self._pending and not transport.is_closing():
            transport.abort()


class _GuardedH11(_Guarded, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers are complete
            self._headers_done()


def _protocol_class(limits: Limits) -> type:
    """httptools (C, as uvicorn prefers when it is installed: bulk bodies cost less CPU) or h11."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return type("HubH11", (_GuardedH11,), {"limits": limits})

    class _GuardedHttpTools(_Guarded, HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            self._headers_done()
            super().on_headers_complete()

    return type("HubHttpTools", (_GuardedHttpTools,), {"limits": limits})


def _counts(server_state: Any) -> Counter:
    counts = getattr(server_state, "hub_per_client", None)
    if counts is None:
        counts = server_state.hub_per_client = Counter()
    return counts


def uvicorn_config(
    app: Any, host: str, port: int, limits: Limits = Limits(), log_level: str = "warning"
) -> Any:
    """The uvicorn configuration of a hub: h11 with the limits above (the test fixture runs the same)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_protocol_class(limits),
        log_level=log_level,
        timeout_keep_alive=limits.keep_alive_s,
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES,
        access_log=False,
        server_header=False,
    )


def exposure_warning(host: str) -> str | None:
    """What listening on `host` risks, when it is reachable from other machines (the hub speaks plain
    HTTP: tokens, private weights and publishes would cross the network readable by anyone on the path)."""
    if is_loopback_host(host):
        return None
    return (
        f"warning: the hub listens on {host} without TLS: bearer tokens, private adapters and uploads "
        "cross the network in clear text, readable and changeable by anyone on the path. Listen on "
        "127.0.0.1 behind a TLS reverse proxy (docs/how-to/behind-a-tls-proxy.md) and pass --public-url "
        "https://..."
    )
