"""Serving parts that need no server: the tenant store, rate limits, eviction policy, the disk cache."""

from __future__ import annotations

import sqlite3
import time

import pytest

from adapterhub_lite.errors import ServingError
from adapterhub_lite.serving.cache import BundleCache
from adapterhub_lite.serving.eviction import Evictor
from adapterhub_lite.serving.ratelimit import RateLimiter
from adapterhub_lite.serving.tenancy import TenantStore, hash_key


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
    wait = lim.admit("t", 3, None)
    assert wait is not None and 1 <= wait <= 20
    assert lim.admit("other", 3, None) is None  # per tenant
    clock[0] += wait
    assert lim.admit("t", 3, None) is None
    # tokens: charged after the fact, then the tenant waits the overshoot off
    assert lim.admit("u", None, 100) is None
    lim.charge_tokens("u", 100, 150)
    wait = lim.admit("u", None, 100)
    assert wait is not None and wait >= 30
    clock[0] += wait
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


def test_bundle_cache_is_bounded_and_never_half_written(tmp_path):
    cache = BundleCache(tmp_path / "c", max_bytes=2500)

    def filler(size):
        def fill(tmp):
            d = tmp / "b"
            d.mkdir()
            (d / "w").write_bytes(b"x" * size)
            return d

        return fill

    def boom(tmp):
        (tmp / "partial").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cache.put("sha256:bad", boom)
    assert cache.get("sha256:bad") is None and not list((tmp_path / "c").iterdir())
    cache.put("sha256:a", filler(1000))
    time.sleep(0.01)
    cache.put("sha256:b", filler(1000), pinned=["sha256:a"])
    time.sleep(0.01)
    cache.put("sha256:c", filler(1000), pinned=["sha256:a"])  # over budget: b goes, a is pinned
    assert cache.get("sha256:a") and cache.get("sha256:c") and cache.get("sha256:b") is None


def test_tenant_cli_shows_key_once_and_errors_cleanly(tmp_path):
    from typer.testing import CliRunner

    from adapterhub_lite.errors import ErrorKind
    from cli.common import EXIT_CODES
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
    from adapterhub_lite.serving.usage import UsageMeter, ask_for_stream_usage, without_usage_event

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
