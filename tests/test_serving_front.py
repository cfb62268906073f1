"""The serving front (the tenancy middleware in vLLM's API server) under hostile input (issue 20's sweep).

Each bad request is a clear 4xx, never a 500, and never reaches the model server; a second tenant's
request succeeds during and after. The middleware is the real one, served by a real uvicorn on loopback
and spoken to over real sockets; what sits behind it is a stand-in for vLLM's routes that records what
reaches it (these bounds are the middleware's: vLLM must never see the requests they refuse, which a
real vLLM could not tell us). `test_serving_front_vllm.py`-style end-to-end checks against vLLM live in
test_serving_vllm.py's world.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from adapterhub_lite.serving.config import ServingConfig
from adapterhub_lite.serving.gateway import asgi
from adapterhub_lite.serving.gateway.metrics import ServingMetrics
from adapterhub_lite.serving.gateway.middleware import TenancyMiddleware
from adapterhub_lite.serving.gateway.openai_request import MAX_JSON_DEPTH, MAX_N, MAX_TOKENS
from adapterhub_lite.tenants.store import TenantStore

BASE = "base"


@dataclass
class StandIn:
    """Answers every request as a completion and records the bodies that reached it."""

    bodies: list[dict] = field(default_factory=list)
    failure: str | None = None  # "500", "502": answer that; "raise": let an exception escape, as vLLM's
    # engine can when it dies under a request

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.bodies.append(json.loads(body))
        if self.failure == "raise":
            raise RuntimeError("EngineDeadError: the engine core died")
        if self.failure is not None:
            error = json.dumps({"error": {"message": "EngineDeadError: engine core died", "code": 500}})
            await send({"type": "http.response.start", "status": int(self.failure), "headers": []})
            await send({"type": "http.response.body", "body": error.encode()[:10], "more_body": True})
            await send({"type": "http.response.body", "body": error.encode()[10:]})
            return
        answer = json.dumps(
            {
                "object": "text_completion",
                "choices": [{"index": 0, "text": "ok"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": answer})


class _NoResolver:
    registry = None

    def fetch(self, ref):  # the base model is never fetched
        raise AssertionError(f"fetch {ref}")

    def base_fingerprint(self):
        return None


@dataclass
class Front:
    url: str
    port: int
    keys: dict[str, str]
    vllm: StandIn
    middleware: TenancyMiddleware

    def post(self, tenant: str | None, body: bytes | dict, **kw) -> httpx.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"content-type": "application/json", **kw.pop("headers", {})}
        if tenant:
            headers["authorization"] = f"Bearer {self.keys[tenant]}"
        return httpx.post(f"{self.url}/v1/completions", content=data, headers=headers, timeout=30, **kw)

    def ok(self, tenant: str = "globex") -> None:
        """The other tenant is served, whatever happened to the first."""
        res = self.post(tenant, {"model": BASE, "prompt": "hi", "max_tokens": 2})
        assert res.status_code == 200, res.text
        assert res.json()["choices"][0]["text"] == "ok"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def front(tmp_path_factory) -> Iterator[Front]:
    store = TenantStore.open(tmp_path_factory.mktemp("front") / "tenants.db")
    keys = {name: store.add_tenant(name, base_access=True)[1] for name in ("acme", "globex")}
    vllm = StandIn()
    mw = TenancyMiddleware(
        vllm,
        config=ServingConfig(admin_key="admin-key", warmup=False, served_name=BASE),
        store=store,
        resolver=_NoResolver(),
        metrics=ServingMetrics(CollectorRegistry()),
    )
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(mw, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield Front(f"http://127.0.0.1:{port}", port, keys, vllm, mw)
    server.should_exit = True
    thread.join(10)


def _error(res: httpx.Response, status: int) -> str:
    assert res.status_code == status, (res.status_code, res.text)
    body = res.json()["error"]
    assert body["code"] == status and "\n" not in body["message"]
    return body["message"]


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("n", 10**9, f"less than or equal to {MAX_N}"),  # vLLM CVE-2026-34756: a huge n crashed it
        ("n", MAX_N + 1, f"less than or equal to {MAX_N}"),
        ("best_of", 10**9, f"less than or equal to {MAX_N}"),
        ("max_tokens", 10**30, f"less than or equal to {MAX_TOKENS}"),
        ("max_completion_tokens", MAX_TOKENS + 1, f"less than or equal to {MAX_TOKENS}"),
        ("n", "5", "valid integer"),
        ("n", 2.0, "valid integer"),
        ("max_tokens", True, "valid integer"),
        ("stream", "true", "valid boolean"),
        ("stream", "false", "valid boolean"),
        ("model", ["base"], "valid string"),
        ("model", {"$ne": 1}, "valid string"),
    ],
)
def test_bounded_and_typed_fields_are_a_clear_400(front, field, value, says):
    before = len(front.vllm.bodies)
    message = _error(front.post("acme", {"model": BASE, "prompt": "hi", field: value}), 400)
    assert f"`{field}`" in message and says in message, message
    assert len(front.vllm.bodies) == before, "the refused request reached the model server"
    front.ok()


def test_fields_within_bounds_pass_through_unchanged(front):
    body = {"model": BASE, "prompt": "hi", "n": MAX_N, "max_tokens": 3, "stream": False, "extra": {"a": [1]}}
    assert front.post("acme", body).status_code == 200
    assert front.vllm.bodies[-1] == body


@pytest.mark.parametrize(
    "body, says",
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested"),  # Python's parser: RecursionError (was a 500)
        (None, "nested"),  # nested one level past the limit, inside an otherwise valid request
        (b"[]", "JSON object"),
        (b'"model"', "JSON object"),
        (b"null", "JSON object"),
        (b"{}", "JSON object with a string `model`"),
        (b"\xff\xfe not utf-8", "not valid JSON"),
        (b'{"model": "base", "prompt": "x"', "not valid JSON"),
        (b"", "not valid JSON"),
    ],
)
def test_malformed_json_is_a_clear_400(front, body, says):
    if body is None:
        deep: object = 1
        for _ in range(MAX_JSON_DEPTH):
            deep = [deep]
        body = json.dumps({"model": BASE, "prompt": "x", "extra": deep}).encode()
    before = len(front.vllm.bodies)
    assert says in _error(front.post("acme", body), 400)
    assert len(front.vllm.bodies) == before
    front.ok()


def test_a_body_over_the_limit_is_refused_on_its_content_length_before_it_is_sent(front):
    """The client announces 100 MiB and sends nothing: the answer is 413 at once, not a wait for it."""
    with socket.create_connection(("127.0.0.1", front.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"authorization: Bearer {front.keys['acme']}\r\n".encode()
            + f"content-length: {100 << 20}\r\n\r\n".encode()
        )
        head = s.recv(65536).decode("latin-1")
    assert head.startswith("HTTP/1.1 413"), head
    front.ok()


def test_a_streamed_body_is_refused_at_the_limit(front):
    """No Content-Length (chunked): reading stops at the limit with a 413."""

    def chunks():
        for _ in range((asgi.MAX_BODY_BYTES >> 20) + 4):
            yield b"x" * (1 << 20)

    res = httpx.post(
        f"{front.url}/v1/completions",
        content=chunks(),
        headers={"authorization": f"Bearer {front.keys['acme']}"},
        timeout=30,
    )
    assert "over the" in _error(res, 413)
    front.ok()


def test_a_malformed_content_length_is_a_400():
    async def receive():
        raise AssertionError("the body was read")

    with pytest.raises(asgi.BodyRefused) as e:
        asyncio.run(asgi.read_body(receive, {"headers": [(b"content-length", "²".encode())]}))
    assert e.value.status == 400


def _asgi_call(mw, headers, chunks: list[bytes]) -> tuple[int, int]:
    """Run one request through the middleware in process; (status, body messages it read)."""
    reads = 0
    sent: list[dict] = []

    async def receive():
        nonlocal reads
        reads += 1
        chunk = chunks[min(reads - 1, len(chunks) - 1)]
        return {"type": "http.request", "body": chunk, "more_body": reads < len(chunks)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    asyncio.run(mw(scope, receive, send))
    return sent[0]["status"], reads


def test_no_body_is_read_before_authentication_or_past_a_declared_limit(front):
    big = [b"x" * (1 << 20)] * 300  # 300 MiB if it were read
    declared = [(b"content-length", str(300 << 20).encode())]
    assert _asgi_call(front.middleware, declared, big) == (401, 0)  # no key: not one byte read
    bad_key = [(b"authorization", b"Bearer ahk_wrong"), *declared]
    assert _asgi_call(front.middleware, bad_key, big) == (401, 0)
    tenant = [(b"authorization", f"Bearer {front.keys['acme']}".encode()), *declared]
    assert _asgi_call(front.middleware, tenant, big) == (413, 0)  # refused on Content-Length alone
    undeclared = [(b"authorization", f"Bearer {front.keys['acme']}".encode())]
    status, reads = _asgi_call(front.middleware, undeclared, big)
    assert status == 413 and reads == (asgi.MAX_BODY_BYTES >> 20) + 1  # stops at the limit


def test_a_client_trickling_its_body_is_cut_off_while_others_are_served(front, monkeypatch):
    monkeypatch.setattr(asgi, "BODY_DEADLINE_S", 1.5)
    result: dict[str, str] = {}

    def trickle():
        with socket.create_connection(("127.0.0.1", front.port), timeout=10) as s:
            s.sendall(
                b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n"
                + f"authorization: Bearer {front.keys['acme']}\r\n\r\n".encode()
            )
            for _ in range(100):  # one byte every 0.1 s, until the server answers: the body would take 100 s
                if select.select([s], [], [], 0.1)[0]:
                    result["head"] = s.recv(65536).decode("latin-1")
                    return
                s.sendall(b" ")

    thread = threading.Thread(target=trickle)
    started = time.monotonic()
    thread.start()
    front.ok()  # served while the trickle holds its connection
    thread.join(15)
    assert result["head"].startswith("HTTP/1.1 408"), result
    assert time.monotonic() - started < 10
    front.ok()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "model",
                "n",
                "best_of",
                "max_tokens",
                "max_completion_tokens",
                "stream",
                "prompt",
                "messages",
                "temperature",
                "stream_options",
                "logprobs",
            ]
        ),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda inner: (
                st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
            ),
            max_leaves=20,
        ),
    )
)
def test_fuzzed_request_bodies_never_get_a_5xx(front, body):
    """Hypothesis-generated bodies of any shape: a 2xx or a 4xx, never a 5xx; the model server only
    sees requests whose bounded fields are in bounds."""
    body.setdefault("model", BASE)
    res = front.post("acme", body)
    assert res.status_code in (200, 400, 404), (res.status_code, res.text, body)
    if res.status_code == 200:
        seen = front.vllm.bodies[-1]
        n = seen.get("n")
        assert n is None or (type(n) is int and 1 <= n <= MAX_N)


# -- against a real vLLM server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[dict]:
    """A real vLLM server (CPU build) on the embedded base, the middleware in front, two tenants with
    base access. No adapters: what is under test is the front, and a base request goes through the
    same middleware path (auth, body, typed fields, rate limits, forwarding) as an adapter request."""
    from adapterhub_lite.base import EMBEDDED_BASE_DIR
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer

    root = tmp_path_factory.mktemp("served-front")
    open_registry(root / "registry")
    store = TenantStore.open(root / "tenants.db")
    keys = {name: store.add_tenant(name, base_access=True)[1] for name in ("acme", "globex")}
    opts = ServeOptions(
        base_dir=str(EMBEDDED_BASE_DIR),
        served_name=BASE,
        registry=str(root / "registry"),
        tenants_db=str(root / "tenants.db"),
        cache_dir=str(root / "cache"),
        max_model_len=256,
        log_path=str(root / "vllm.log"),
    )
    server = VLLMServer(opts).start()
    try:
        yield {"url": server.url, "keys": keys, "log": root / "vllm.log"}
    finally:
        server.stop()


def _served_post(served: dict, tenant: str, path: str, body: object) -> httpx.Response:
    return httpx.post(
        served["url"] + path,
        content=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {served['keys'][tenant]}", "content-type": "application/json"},
        timeout=120,
    )


def _served_ok(served: dict) -> None:
    res = _served_post(served, "globex", "/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 2})
    assert res.status_code == 200, res.text
    assert res.json()["usage"]["completion_tokens"] == 2


@pytest.mark.slow
@pytest.mark.vllm
def test_huge_n_and_max_tokens_never_reach_vllm_and_others_are_served(served):
    """vLLM CVE-2026-34756: one request with a huge `n` crashed the server for every tenant."""
    for path, base in (
        ("/v1/completions", {"model": BASE, "prompt": "hi"}),
        ("/v1/chat/completions", {"model": BASE, "messages": [{"role": "user", "content": "hi"}]}),
    ):
        for extra in ({"n": 10**9}, {"best_of": 10**6}, {"max_tokens": 10**30}, {"n": "2"}):
            res = _served_post(served, "acme", path, {**base, **extra})
            assert res.status_code == 400, (extra, res.text)
            assert res.json()["error"]["code"] == 400
        _served_ok(served)
    res = _served_post(
        served, "acme", "/v1/completions", {"model": BASE, "prompt": "hi", "n": 2, "max_tokens": 2}
    )
    assert res.status_code == 200 and len(res.json()["choices"]) == 2


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=12,
)
# Fields of vLLM's completion and chat requests (its /openapi.json), each given typed values and
# anything at all; small integers mostly, so that accepted requests stay cheap on a CPU server.
_FIELDS = {
    "prompt": st.text(max_size=20) | st.lists(st.integers(0, 1000), max_size=5) | _JSON,
    "messages": st.lists(
        st.fixed_dictionaries(
            {
                "role": st.sampled_from(["user", "system", "assistant", "tool"]),
                "content": st.text(max_size=20) | _JSON,
            }
        ),
        max_size=3,
    )
    | _JSON,
    "n": st.integers(-2, 3) | _JSON,
    "best_of": st.integers(-2, 3) | _JSON,
    "max_tokens": st.integers(-2, 4) | st.integers() | _JSON,
    "max_completion_tokens": st.integers(-2, 4) | _JSON,
    "temperature": st.floats(allow_nan=False) | _JSON,
    "top_p": st.floats(allow_nan=False) | _JSON,
    "top_k": st.integers() | _JSON,
    "logprobs": st.integers(-2, 30) | st.booleans() | _JSON,
    "top_logprobs": st.integers(-2, 30) | _JSON,
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | _JSON,
    "seed": st.integers() | _JSON,
    "stream": st.booleans() | _JSON,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | _JSON,
    "echo": st.booleans() | _JSON,
    "logit_bias": st.dictionaries(st.integers(0, 1000).map(str), st.floats(-100, 100), max_size=3) | _JSON,
    "response_format": _JSON,
    "tools": _JSON,
    "user": _JSON,
}


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_fuzzed_openai_requests_with_a_tenant_key_never_get_a_5xx(served, path):
    """Property-based bodies for the OpenAI routes, sent with a tenant key to the middleware in front
    of a real vLLM: every answer is a 2xx or 4xx, and another tenant is served afterwards."""
    required = "prompt" if path == "/v1/completions" else "messages"
    seen: list[tuple[int, dict]] = []

    @settings(max_examples=60, deadline=None, database=None)
    @given(
        st.fixed_dictionaries(
            {required: _FIELDS[required]}, optional={k: v for k, v in _FIELDS.items() if k != required}
        )
    )
    def check(body: dict) -> None:
        body["model"] = BASE
        if body.get("stream") is True:
            body["max_tokens"] = 2  # a stream is read to its end: keep it short
        res = _served_post(served, "acme", path, body)
        seen.append((res.status_code, body))
        assert res.status_code < 500, (res.status_code, res.text[:300], body)

    check()
    assert any(status == 200 for status, _ in seen) and any(400 <= s < 500 for s, _ in seen)
    _served_ok(served)


@pytest.mark.parametrize("failure", ["500", "502", "raise"])
def test_a_server_error_from_vllm_reaches_the_client_as_a_503_with_retry_after(front, failure):
    """A stop under load aborts requests inside vLLM (a 500 from its engine, or an exception escaping);
    the client is told to retry (503, Retry-After), never shown a 500 or vLLM's internals."""
    front.vllm.failure = failure
    try:
        res = front.post("acme", {"model": BASE, "prompt": "hi", "max_tokens": 2})
    finally:
        front.vllm.failure = None
    message = _error(res, 503)
    assert res.headers["retry-after"] == "2"
    assert "retry" in message and "Engine" not in message, message
    front.ok()
