"""OpenTelemetry traces of the gateway: one span per request, a child span per step, exported over OTLP.

Every request through the tenancy middleware (health checks aside) gets a root span `adapterhub.request`
(kind SERVER), the child of the caller's W3C `traceparent` when it sends one. Its steps are child spans,
one after the other: `adapterhub.authenticate`, `adapterhub.read_body`, `adapterhub.resolve` (in the
tenant's view), `adapterhub.rate_limit`, `adapterhub.fetch` (registry pull and verification, or the disk
cache), `adapterhub.load` (room in the hot set before vLLM loads it) and `adapterhub.forward` (vLLM's
answer, to the last streamed byte). The forwarded request carries the forward span as its `traceparent`,
so vLLM's own `llm_request` span (vLLM started with `--otlp-traces-endpoint`) is its child.

Attributes (all under `adapterhub.`): `tenant`, `alias`, `ref` (the immutable reference), `cache` (hit or
miss in the verified-bundle disk cache), `fetch_ms`, `verify_ms`, `hot_set` (hit: vLLM had it loaded),
`evicted`; on the root `http.response.status_code` and the token counts (`gen_ai.usage.input_tokens`,
`gen_ai.usage.output_tokens`). Never a key, a header, a prompt or an answer: only the values above are
ever set, and the alias only once it resolved in the tenant's view (a name a client made up is data).
A response of 400 or more sets the status ERROR on the root and on the step that answered it.

A step is begun by `phase(name)`, which ends the step before it: the middleware calls one function per
step, with no change to its control flow. The request's trace lives in a context variable, so the
resolver (in a worker thread, through `asyncio.to_thread`, which copies the context) adds its facts
with `note(...)` without being handed anything.

Off (no `ADAPTERHUB_OTLP_ENDPOINT`, no `--otlp-endpoint`) nothing of the SDK is imported or set up, and
each call here is one context-variable read. On, spans go to a `BatchSpanProcessor` (a bounded queue:
beyond `QUEUE_MAX` spans are dropped, never waited for) in front of the OTLP/HTTP protobuf exporter, on a
tracer provider of the middleware's own (vLLM sets the global one for its spans); the server's lifespan
shutdown flushes it. `ADAPTERHUB_OTLP_SAMPLE_RATIO` samples new traces (a caller's sampled flag wins).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Any]

PREFIX = "adapterhub."
TRACES_PATH = "/v1/traces"
QUEUE_MAX = 4096  # spans held for export at most (a request makes up to 8)
EXPORT_BATCH = 512
EXPORT_DELAY_MS = 1000
_MAX_VALUE = 200  # characters of a string attribute (aliases and references are shorter by their rules)

_current: ContextVar[_RequestTrace | None] = ContextVar("adapterhub_trace", default=None)


def traces_url(endpoint: str) -> str:
    """The URL spans are POSTed to: `endpoint` itself when it names `/v1/traces`, else its `/v1/traces`
    (an OTLP/HTTP collector's address, as `http://collector:4318`)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(TRACES_PATH) else endpoint + TRACES_PATH


class Tracing:
    """The middleware's tracer provider, its batch processor and its exporter."""

    def __init__(self, exporter: Any, sample_ratio: float = 1.0) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(
            resource=Resource.create({"service.name": "adapterhub"}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        self.processor = BatchSpanProcessor(
            exporter,
            max_queue_size=QUEUE_MAX,
            max_export_batch_size=EXPORT_BATCH,
            schedule_delay_millis=EXPORT_DELAY_MS,
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("adapterhub_lite.serving")
        self.propagator = TraceContextTextMapPropagator()

    @classmethod
    def otlp(cls, endpoint: str, sample_ratio: float = 1.0) -> Tracing:
        """Spans exported over OTLP/HTTP (protobuf) to the collector at `endpoint`."""
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return cls(OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=10), sample_ratio)

    @asynccontextmanager
    async def request(self, scope: Scope, send: Send) -> AsyncIterator[Send]:
        """Trace one HTTP request: yields the `send` to answer it through (it notes the status)."""
        from opentelemetry.trace import SpanKind

        parent = self.propagator.extract(_TraceHeaders(scope.get("headers") or ()))
        root = self.tracer.start_span(
            PREFIX + "request",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": scope.get("method", ""), "url.path": scope.get("path", "")},
        )
        trace = _RequestTrace(self, root)
        token = _current.set(trace)

        async def traced_send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                trace.answered(int(message.get("status", 0)))
            await send(message)

        try:
            yield traced_send
        except BaseException as exc:
            trace.failed(exc)
            raise
        finally:
            _current.reset(token)
            trace.end()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Export every span ended so far; False when the exporter did not finish in time."""
        return self.processor.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flush and stop the exporter (the server's lifespan shutdown)."""
        self.provider.shutdown()


class _TraceHeaders(dict):
    """The request's `traceparent`/`tracestate` as the propagator reads them (the only headers read)."""

    def __init__(self, headers: Any) -> None:
        super().__init__()
        for name, value in headers:
            if name in (b"traceparent", b"tracestate"):
                self[name.decode("latin-1")] = value.decode("latin-1")


class _RequestTrace:
    """One request's root span and the step span open now."""

    __slots__ = ("tracing", "root", "context", "step", "status")

    def __init__(self, tracing: Tracing, root: Any) -> None:
        from opentelemetry.trace import set_span_in_context

        self.tracing = tracing
        self.root = root
        self.context = set_span_in_context(root)
        self.step: Any = None
        self.status = 0

    def phase(self, name: str) -> None:
        self.end_step()
        self.step = self.tracing.tracer.start_span(PREFIX + name, context=self.context)

    def end_step(self) -> None:
        if self.step is not None:
            self.step.end()
            self.step = None

    def answered(self, status: int) -> None:
        self.status = status
        self.root.set_attribute("http.response.status_code", status)
        if status >= 400:
            from opentelemetry.trace import Status, StatusCode

            if self.step is not None:
                self.step.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            self.root.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))

    def failed(self, exc: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        # The exception's type only: its message may quote the request.
        status = Status(StatusCode.ERROR, type(exc).__name__)
        if self.step is not None:
            self.step.set_status(status)
        self.root.set_status(status)

    def end(self) -> None:
        self.end_step()
        self.root.end()


def open_tracing(endpoint: str | None, sample_ratio: float = 1.0) -> Tracing | None:
    """Tracing to `endpoint` (an OTLP/HTTP collector), or None when no endpoint is set (tracing off)."""
    return Tracing.otlp(endpoint, sample_ratio) if endpoint else None


# -- what the gateway calls on the way: one context-variable read each when the request is not traced -----


def phase(name: str) -> None:
    """End the request's current step and begin the step `name`."""
    trace = _current.get()
    if trace is not None:
        trace.phase(name)


def _value(value: Any) -> Any:
    if isinstance(value, str):
        return value[:_MAX_VALUE]
    if isinstance(value, float):
        return round(value, 3)
    return value


def note(**attributes: Any) -> None:
    """Set `adapterhub.<name>` attributes on the current step (on the root when no step is open)."""
    trace = _current.get()
    if trace is not None:
        span = trace.step if trace.step is not None else trace.root
        span.set_attributes({PREFIX + k: _value(v) for k, v in attributes.items()})


def note_request(**attributes: Any) -> None:
    """Set `adapterhub.<name>` attributes on the request's root span (who asked, for what)."""
    trace = _current.get()
    if trace is not None:
        trace.root.set_attributes({PREFIX + k: _value(v) for k, v in attributes.items()})


def tokens(prompt: int, completion: int) -> None:
    """The tokens the client was told, on the root span."""
    trace = _current.get()
    if trace is not None:
        trace.root.set_attributes(
            {"gen_ai.usage.input_tokens": prompt, "gen_ai.usage.output_tokens": completion}
        )


def elapsed_ms(since: float) -> float:
    """Milliseconds since `since` (a `time.perf_counter()` reading)."""
    return (time.perf_counter() - since) * 1000.0


def propagate(scope: Scope) -> None:
    """Make the request's `traceparent` (and `tracestate`) name the current step, for vLLM to continue:
    the caller's own are replaced, since vLLM's span is a child of ours, not of the caller's."""
    trace = _current.get()
    if trace is None:
        return
    from opentelemetry.trace import set_span_in_context

    carrier: dict[str, str] = {}
    span = trace.step if trace.step is not None else trace.root
    trace.tracing.propagator.inject(carrier, context=set_span_in_context(span))
    headers = [(k, v) for k, v in scope["headers"] if k not in (b"traceparent", b"tracestate")]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items()]
    scope["headers"] = headers
