"""OpenTelemetry traces of the gateway (serving/tracing.py).

The fast tests run the real middleware, a real registry, a real bundle and the real resolver with the real
OpenTelemetry SDK (its in-memory exporter); what sits behind the middleware is a stand-in for vLLM's
completions route that records the headers reaching it (only vLLM's answer is faked, so these need no
model). The slow test starts a real vLLM server exporting to a real OTLP/HTTP receiver on loopback (a
small HTTP server in this file decoding the protobuf requests with opentelemetry-proto) and reads back
the spans of a request sent by the real `openai` client.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from gateway_client import call

REPO = Path(__file__).resolve().parents[1]
PROMPT = "SECRET-PROMPT-7c1e"
ANSWER = "SECRET-ANSWER-44d0"
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
STEPS = ["authenticate", "read_body", "resolve", "rate_limit", "fetch", "load", "forward"]


@dataclass
class StandIn:
    """Answers like vLLM's completions route and records the headers of each request reaching it."""

    headers: list[dict[bytes, bytes]] = field(default_factory=list)

    async def __call__(self, scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        self.headers.append(dict(scope["headers"]))
        usage = {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}
        body = json.dumps({"choices": [{"text": ANSWER}], "usage": usage}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def gateway(tmp_path, tiny_base, lora_dir):
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from prometheus_client import CollectorRegistry

    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.gateway.metrics import ServingMetrics
    from adapterhub_lite.serving.gateway.middleware import TenancyMiddleware
    from adapterhub_lite.serving.plugin.resolver import AdapterResolver
    from adapterhub_lite.serving.tracing import Tracing
    from adapterhub_lite.tenants.store import TenantStore

    bundle = pack_bundle(lora_dir, tmp_path / "b", namespace="acme", name="bot", version="1.0.0",
                         base_dir=tiny_base, vllm_check=False)
    ref = open_registry(tmp_path / "registry").publish(bundle).ref
    store = TenantStore.open(tmp_path / "tenants.db")
    _, key = store.add_tenant("acme", base_access=True)
    store.set_alias("acme", "bot", ref)
    config = ServingConfig(admin_key="admin-key", warmup=False, served_name="base",
                           registry=str(tmp_path / "registry"), base_dir=str(tiny_base),
                           cache_dir=str(tmp_path / "cache"), max_lora_rank=16)
    vllm = StandIn()
    mw = TenancyMiddleware(vllm, config=config, store=store, resolver=AdapterResolver(config),
                           metrics=ServingMetrics(CollectorRegistry()))
    assert mw.tracing is None  # no endpoint configured: off
    exporter = InMemorySpanExporter()
    mw.tracing = Tracing(exporter)
    yield mw, key, ref, vllm, exporter
    if mw.ledger is not None:
        mw.ledger.close()


def _call(mw, key: str | None, model: str = "bot", traceparent: str | None = None) -> int:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": 9}).encode()
    headers = [(b"traceparent", traceparent.encode())] if traceparent else []
    return call(mw, "/v1/completions", key=key, body=body, headers=headers)[0]["status"]


def _traces(mw, exporter) -> list[tuple]:
    """(root, {step name: span}) per request, in the order the requests were made."""
    assert mw.tracing.flush()
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.name == "adapterhub.request"]
    out = []
    for root in sorted(roots, key=lambda s: s.start_time):
        steps = [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
        assert all(s.context.trace_id == root.context.trace_id for s in steps)
        ordered = sorted(steps, key=lambda s: s.start_time)
        out.append((root, {s.name.removeprefix("adapterhub."): s for s in ordered}))
    assert sum(1 + len(steps) for _, steps in out) == len(spans)  # every span belongs to one request
    return out


def test_a_request_through_an_adapter_is_one_trace_naming_the_adapter(gateway):
    from opentelemetry.trace import StatusCode

    mw, key, ref, vllm, exporter = gateway
    caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    assert _call(mw, key, traceparent=caller) == 200
    assert _call(mw, key) == 200  # the bundle is in the disk cache now
    assert _call(mw, "ahk_" + "x" * 43) == 401
    assert _call(mw, key, model=PROMPT) == 404  # a name outside the view: never recorded

    (first, steps1), (second, steps2), (refused, steps3), (unknown, steps4) = _traces(mw, exporter)
    # The caller's trace continues: the root is the child of its traceparent.
    assert format(first.context.trace_id, "032x") == CALLER_TRACE
    assert format(first.parent.span_id, "016x") == CALLER_SPAN and first.parent.is_remote
    assert second.parent is None and second.context.trace_id != first.context.trace_id
    assert list(steps1) == STEPS and list(steps2) == STEPS
    for root in (first, second):
        who = ("adapterhub.tenant", "adapterhub.alias", "adapterhub.ref")
        assert [root.attributes[k] for k in who] == ["acme", "bot", ref]
        assert root.attributes["http.response.status_code"] == 200
        assert root.attributes["gen_ai.usage.input_tokens"] == 4
        assert root.attributes["gen_ai.usage.output_tokens"] == 9
        assert root.status.status_code is StatusCode.UNSET
    assert steps1["fetch"].attributes["adapterhub.cache"] == "miss"
    assert steps1["fetch"].attributes["adapterhub.verify_ms"] > 0
    assert steps2["fetch"].attributes["adapterhub.cache"] == "hit"
    fetched = steps1["fetch"].attributes
    assert fetched["adapterhub.fetch_ms"] >= fetched["adapterhub.verify_ms"]
    # vLLM was handed the forward step as its parent, not the caller's span.
    forward = steps1["forward"].context
    assert vllm.headers[0][b"traceparent"] == f"00-{forward.trace_id:032x}-{forward.span_id:016x}-01".encode()
    assert b"authorization" not in vllm.headers[0]

    # The refusal: an error, at the step that refused, with no tenant.
    assert refused.status.status_code is StatusCode.ERROR
    assert refused.attributes["http.response.status_code"] == 401
    assert list(steps3) == ["authenticate"] and steps3["authenticate"].status.status_code is StatusCode.ERROR
    assert not any(k.startswith("adapterhub.tenant") for k in refused.attributes)
    assert unknown.attributes["adapterhub.tenant"] == "acme" and "adapterhub.alias" not in unknown.attributes
    assert list(steps4) == ["authenticate", "read_body", "resolve"]

    # Nothing secret anywhere: not the key, not the prompt, not the answer, not the made-up model name.
    for span in exporter.get_finished_spans():
        texts = [str(v) for v in span.attributes.values()]
        texts += [str(v) for e in span.events for v in (e.name, *e.attributes.values())]
        texts.append(span.name)
        for secret in (key, key[4:], PROMPT, ANSWER):
            assert not any(secret in t for t in texts), (span.name, secret)


_OFF = """
import asyncio, json, sys
from prometheus_client import CollectorRegistry
from adapterhub_lite.serving.config import ServingConfig
from adapterhub_lite.serving.gateway.metrics import ServingMetrics
from adapterhub_lite.serving.gateway.middleware import TenancyMiddleware
from adapterhub_lite.tenants.store import TenantStore

store = TenantStore.open(sys.argv[1])
_, key = store.add_tenant("acme", base_access=True)
seen = []
async def vllm(scope, receive, send):
    seen.append(dict(scope["headers"]))
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b'{"usage": {"prompt_tokens": 1}}'})
class NoRegistry:
    registry = None
mw = TenancyMiddleware(vllm, config=ServingConfig(admin_key="a", warmup=False, served_name="base"),
                       store=store, resolver=NoRegistry(), metrics=ServingMetrics(CollectorRegistry()))
scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
         "headers": [(b"authorization", f"Bearer {key}".encode()), (b"traceparent", sys.argv[2].encode())]}
async def receive():
    return {"type": "http.request", "body": b'{"model": "base", "prompt": "x"}', "more_body": False}
async def send(message):
    pass
async def run():
    await mw(scope, receive, send)
    mw._sweeper.cancel()
asyncio.run(run())
mw.ledger and mw.ledger.close()
print(json.dumps({"tracing": mw.tracing is not None, "traceparent": seen[0][b"traceparent"].decode(),
                  "sdk": sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk"))}))
"""


def test_tracing_off_sets_up_nothing_and_passes_the_callers_context_untouched(tmp_path):
    caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    proc = subprocess.run([sys.executable, "-c", _OFF, str(tmp_path / "t.db"), caller], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"tracing": False, "traceparent": caller, "sdk": []}


def test_the_endpoint_reaches_the_middleware_and_vllm(tiny_base):
    from adapterhub_lite.serving.supervisor.launcher import ServeOptions, build_command
    from adapterhub_lite.serving.tracing import traces_url

    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/v1/traces/") == "http://collector:4318/v1/traces"
    opts = ServeOptions(base_dir=str(tiny_base), otlp_endpoint="http://127.0.0.1:4318",
                        otlp_sample_ratio=0.25)
    cmd, env = build_command(opts)
    assert env["ADAPTERHUB_OTLP_ENDPOINT"] == "http://127.0.0.1:4318"
    assert env["ADAPTERHUB_OTLP_SAMPLE_RATIO"] == "0.25"
    assert env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == "http/protobuf"
    i = cmd.index("--otlp-traces-endpoint")
    assert cmd[i + 1] == "http://127.0.0.1:4318/v1/traces"
    cmd, env = build_command(ServeOptions(base_dir=str(tiny_base)))
    assert "--otlp-traces-endpoint" not in cmd and "ADAPTERHUB_OTLP_ENDPOINT" not in env


# -- a real vLLM server exporting to a real OTLP/HTTP receiver ----------------------------------------------


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: `POST /v1/traces` with an ExportTraceServiceRequest."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list = []  # (resource attributes, span)
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for rs in request.resource_spans:
                        resource = {a.key: a.value.string_value for a in rs.resource.attributes}
                        for ss in rs.scope_spans:
                            receiver.spans.extend((resource, s) for s in ss.spans)
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def find(self, predicate) -> list:
        with self.lock:
            return [s for _, s in self.spans if predicate(s)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value if v.HasField("string_value") else (
            v.int_value if v.HasField("int_value") else v.double_value)
    return out


def _wait(condition, timeout: float, what: str):
    import time

    deadline = time.monotonic() + timeout
    while not (got := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
    return got


@pytest.mark.slow
@pytest.mark.vllm
def test_a_real_server_exports_a_trace_naming_the_adapter_and_vllm_continues_it(tmp_path):
    import openai
    from bundle_fixtures import make_adapter
    from test_serving_vllm import _base_dir

    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer
    from adapterhub_lite.tenants import TenantStore

    base = _base_dir()
    adapter = make_adapter(base, tmp_path / "adapter", seed=7)
    bundle = pack_bundle(adapter, tmp_path / "bot.bundle", namespace="acme", name="bot", version="1.0.0",
                         base_dir=base)
    ref = open_registry(tmp_path / "registry").publish(bundle).ref
    store = TenantStore.open(tmp_path / "tenants.db")
    _, key = store.add_tenant("acme")
    store.set_alias("acme", "bot", ref)
    receiver = Receiver()
    opts = ServeOptions(
        base_dir=str(base), served_name="base", registry=str(tmp_path / "registry"),
        tenants_db=str(tmp_path / "tenants.db"), cache_dir=str(tmp_path / "cache"), max_loras=2,
        max_cpu_loras=2, max_loaded=2, max_lora_rank=16, max_model_len=256,
        log_path=str(tmp_path / "vllm.log"), otlp_endpoint=receiver.url,
    )
    server = VLLMServer(opts, startup_timeout=900).start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        caller = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        usage = client.completions.create(model="bot", prompt=PROMPT, max_tokens=4, temperature=0,
                                          extra_headers={"traceparent": caller}).usage
        trace_id = bytes.fromhex(CALLER_TRACE)
        (root,) = _wait(lambda: receiver.find(lambda s: s.name == "adapterhub.request"
                                              and s.trace_id == trace_id), 60, "the gateway's span")
        a = attrs(root)
        assert [a["adapterhub.ref"], a["adapterhub.alias"], a["adapterhub.tenant"]] == [ref, "bot", "acme"]
        assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens
        assert root.parent_span_id == bytes.fromhex(CALLER_SPAN)
        steps = {s.name: s for s in receiver.find(lambda s: s.parent_span_id == root.span_id)}
        assert set(steps) == {f"adapterhub.{n}" for n in STEPS}
        assert attrs(steps["adapterhub.fetch"])["adapterhub.cache"] == "miss"
        # vLLM's own span of the request is the child of the gateway's forward step.
        forward = steps["adapterhub.forward"]
        (llm,) = _wait(lambda: receiver.find(lambda s: s.name == "llm_request" and s.trace_id == trace_id),
                       60, "vLLM's llm_request span")
        assert llm.parent_span_id == forward.span_id
        assert attrs(llm)["gen_ai.usage.completion_tokens"] == usage.completion_tokens
        for _, span in receiver.spans:
            assert key not in str(span) and PROMPT not in str(span)
    finally:
        server.stop()
        receiver.close()
