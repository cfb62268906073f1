"""`adapterhub top` (serving/top.py) against a real gateway on loopback.

The real tenancy middleware, with a real registry, bundle, resolver and disk cache and its real metrics
objects, is served by a real uvicorn; behind it a stand-in for vLLM answers completions and serves the
metrics registry's own `/metrics` page (prometheus_client's exposition, as vLLM's route does), so no
model is needed. `top` reads it over HTTP as it would read a real server.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from typer.testing import CliRunner

ADMIN = "admin-key"
USAGE = {"prompt_tokens": 4, "completion_tokens": 9, "total_tokens": 13}


@dataclass
class Served:
    url: str
    key: str
    ref: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tmp_path, tiny_base, lora_dir) -> Iterator[Served]:
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.gateway.metrics import ServingMetrics
    from adapterhub_lite.serving.gateway.middleware import TenancyMiddleware
    from adapterhub_lite.serving.plugin.resolver import AdapterResolver
    from adapterhub_lite.tenants.store import TenantStore

    bundle = pack_bundle(lora_dir, tmp_path / "b", namespace="acme", name="bot", version="1.0.0",
                         base_dir=tiny_base, vllm_check=False)
    ref = open_registry(tmp_path / "registry").publish(bundle).ref
    store = TenantStore.open(tmp_path / "tenants.db")
    _, key = store.add_tenant("acme", base_access=True)
    store.set_alias("acme", "bot", ref)
    registry = CollectorRegistry()

    async def vllm(scope, receive, send):
        """Stands in for vLLM: its /metrics route, and completions answered with a usage object."""
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["path"] == "/metrics":
            body, kind = generate_latest(registry), b"text/plain; version=0.0.4"
        else:
            while (await receive()).get("more_body"):
                pass
            body = json.dumps({"choices": [{"text": "ok"}], "usage": USAGE}).encode()
            kind = b"application/json"
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind)]})
        await send({"type": "http.response.body", "body": body})

    config = ServingConfig(admin_key=ADMIN, warmup=False, served_name="base",
                           registry=str(tmp_path / "registry"), base_dir=str(tiny_base),
                           cache_dir=str(tmp_path / "cache"), max_lora_rank=16)
    mw = TenancyMiddleware(vllm, config=config, store=store, resolver=AdapterResolver(config),
                           metrics=ServingMetrics(registry))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(mw, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield Served(f"http://127.0.0.1:{port}", key, ref)
    server.should_exit = True
    thread.join(10)
    if mw.ledger is not None:
        mw.ledger.close()


def _ask(served: Served, model: str, key: str | None = None) -> int:
    return httpx.post(served.url + "/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 9},
                      headers={"authorization": f"Bearer {key or served.key}"}, timeout=30).status_code


def test_rates_are_the_difference_of_two_scrapes(served):
    from adapterhub_lite.serving.top import Server, frame

    server = Server(served.url, ADMIN)
    assert _ask(served, "bot") == 200  # the adapter is fetched, verified and cached
    before = server.scrape()
    statuses = [_ask(served, "bot") for _ in range(3)] + [_ask(served, "base"), _ask(served, "nope")]
    assert statuses == [200, 200, 200, 200, 404]
    assert _ask(served, "bot", key="ahk_" + "x" * 43) == 401
    after = server.scrape()
    view = frame(before, after)
    dt = view.interval_s
    tenants = {r.name: r for r in view.tenants}
    acme = tenants["acme"]
    # Between the scrapes acme made 4 answered requests (13 tokens each) and one refused (the 404).
    assert acme.requests == 1 + 4 + 1 and round(acme.requests_per_s * dt, 6) == 5
    assert round(acme.tokens_per_s * dt, 6) == 4 * 13 and round(acme.errors_per_s * dt, 6) == 1
    assert round(tenants["(unauthenticated)"].errors_per_s * dt, 6) == 1
    adapters = {r.name: r for r in view.adapters}
    assert round(adapters[served.ref].tokens_per_s * dt, 6) == 3 * 13 and adapters[served.ref].requests == 4
    assert after.status["cache"] and after.status["capacity"] >= 1
    server.close()
    # The dashboard's latency and cache series (docs/grafana/adapterhub.json) hold what happened.
    from prometheus_client.parser import text_string_to_metric_families

    page = httpx.get(served.url + "/metrics", headers={"authorization": f"Bearer {ADMIN}"}).text
    samples = {(s.name, s.labels.get("tenant")): s.value
               for f in text_string_to_metric_families(page) for s in f.samples}
    assert samples[("adapterhub_request_duration_seconds_count", "acme")] == 5  # every forwarded answer
    assert samples[("adapterhub_cache_bytes", None)] == after.status["cache_bytes"] > 0  # nothing changed


def _top(*args: str):
    from cli.main import app

    return CliRunner().invoke(app, ["top", *args])


def test_top_once_prints_one_frame_and_refuses_in_one_line(served):
    assert _ask(served, "bot") == 200
    result = _top("--server", served.url, "--admin-key", ADMIN, "--once", "--interval", "0.2")
    assert result.exit_code == 0, result.output
    for text in ("Tenants", "Adapters", "acme", served.ref, "hot set", "cache 1 bundles"):
        assert text in result.output, (text, result.output)

    wrong = _top("--server", served.url, "--admin-key", served.key, "--once")  # a tenant's key
    assert wrong.exit_code == 77 and "refused the admin key" in wrong.output
    gone = _top("--server", f"http://127.0.0.1:{_free_port()}", "--admin-key", ADMIN, "--once")
    assert gone.exit_code == 69 and "cannot reach" in gone.output
    bad = _top("--server", "ftp://x", "--admin-key", ADMIN, "--once")
    assert bad.exit_code == 65 and "http(s) URL" in bad.output
    for result in (wrong, gone, bad):
        assert len(result.output.strip().splitlines()) <= 2 and "Traceback" not in result.output
