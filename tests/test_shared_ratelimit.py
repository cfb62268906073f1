"""Rate limits shared through a real Redis server: one bucket per tenant across replicas, outages."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time

import pytest

from adapterhub_lite.errors import ErrorKind, ServingError, http_status
from adapterhub_lite.serving.gateway.ratelimit import RateLimiter
from adapterhub_lite.serving.gateway.shared_ratelimit import SharedRateLimiter, redact


def _run(coro):
    return asyncio.run(coro)


async def _admitted(limiters: list[SharedRateLimiter], tenant: str, n: int, rpm: int) -> int:
    ok = 0
    for i in range(n):
        if await limiters[i % len(limiters)].admit(tenant, rpm, None) is None:
            ok += 1
    return ok


def test_two_replicas_share_one_bucket(redis_server):
    """A limit of N a minute gives N successes across two replicas, not 2N."""
    rpm = 6  # one request refills every 10 s: the burst below is the whole allowance

    async def go():
        a, b = SharedRateLimiter(redis_server.url), SharedRateLimiter(redis_server.url)
        start = time.monotonic()
        ok = await _admitted([a, b], "acme-two", 30, rpm)
        wait = await a.admit("acme-two", rpm, None)
        elapsed = time.monotonic() - start
        await a.close()
        await b.close()
        return ok, elapsed, wait

    ok, elapsed, wait = _run(go())
    assert rpm <= ok <= rpm + math.floor(elapsed * rpm / 60.0)
    # The bucket refills one request every 60/6 = 10 s. Emptied `elapsed` seconds after it was full, it
    # holds at most elapsed/10 of a request, so the wait is at least 10 - elapsed (rounded up to whole
    # seconds, never past 10). A limiter refilling twice as fast would answer at most 5.
    assert wait is not None and 10.0 - elapsed <= wait <= 10.0, (wait, elapsed)


@pytest.mark.slow
def test_another_process_shares_the_bucket(redis_server):
    """A separate process (another replica) draws from the same allowance."""
    rpm = 4
    code = (
        "import asyncio, sys\n"
        "from adapterhub_lite.serving.gateway.shared_ratelimit import SharedRateLimiter\n"
        "async def go():\n"
        f"    lim = SharedRateLimiter({redis_server.url!r})\n"
        f"    ok = sum([await lim.admit('globex-proc', {rpm}, None) is None for _ in range(3)])\n"
        "    await lim.close()\n"
        "    print(ok)\n"
        "asyncio.run(go())\n"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    assert int(child.stdout.strip()) == 3

    async def go():
        lim = SharedRateLimiter(redis_server.url)
        ok = await _admitted([lim], "globex-proc", 5, rpm)
        await lim.close()
        return ok

    assert _run(go()) == 1  # 4 a minute, 3 taken by the other process


def test_tokens_are_charged_fleet_wide(redis_server):
    """Tokens one replica charged block the tenant on the other until the bucket refills."""

    async def go():
        a, b = SharedRateLimiter(redis_server.url), SharedRateLimiter(redis_server.url)
        assert await a.admit("initech", None, 600) is None
        await a.charge_tokens("initech", 600, 900)  # overshoot by 300 tokens: 30 s at 600/min
        wait = await b.admit("initech", None, 600)
        await a.close()
        await b.close()
        return wait

    wait = _run(go())
    assert wait is not None and 29.0 <= wait <= 31.0


def test_matches_the_in_process_limiter(redis_server):
    """The same sequence of calls admits the same requests in Redis as in process."""
    local = RateLimiter()
    local_ok = [local.admit("same", 5, None) is None for _ in range(8)]

    async def go():
        lim = SharedRateLimiter(redis_server.url)
        ok = [await lim.admit("same", 5, None) is None for _ in range(8)]
        await lim.close()
        return ok

    assert _run(go()) == local_ok == [True] * 5 + [False] * 3


def test_idle_buckets_expire(redis_server):
    """Every bucket written carries an expiry, so Redis memory stays bounded under tenant churn."""
    import redis

    async def go():
        lim = SharedRateLimiter(redis_server.url, prefix="churn:")
        for i in range(50):
            await lim.admit(f"t{i}", 10, 100)
        await lim.close()

    _run(go())
    r = redis.Redis.from_url(redis_server.url)
    keys = r.keys("churn:*")
    assert len(keys) == 100
    assert all(0 < r.ttl(k) <= 120 for k in keys)
    r.close()


def test_outage_fails_open_or_closed_and_recovers(own_redis):
    """Redis down: open admits, closed answers UNAVAILABLE (503 + Retry-After); both recover. (A server
    of its own: the session's is shared by the other tests.)"""
    redis_server = own_redis

    async def go():
        opened = SharedRateLimiter(redis_server.url, failure="open")
        closed = SharedRateLimiter(redis_server.url, failure="closed")
        assert await closed.admit("outage", 100, None) is None
        redis_server.stop()
        try:
            assert await opened.admit("outage", 100, None) is None
            with pytest.raises(ServingError) as err:
                await closed.admit("outage", 100, None)
            await closed.charge_tokens("outage", 100, 5)  # best effort, never raises after the fact
        finally:
            redis_server.start()
        assert await closed.admit("outage", 100, None) is None
        await opened.close()
        await closed.close()
        return err.value

    err = _run(go())
    assert err.kind is ErrorKind.UNAVAILABLE and http_status(err) == 503 and err.retry_after
    assert "\n" not in err.message


def test_bad_urls_are_refused_in_one_line():
    with pytest.raises(ServingError, match="unsupported scheme 'http'.*") as err:
        SharedRateLimiter("http://127.0.0.1:1/")
    assert err.value.kind is ErrorKind.INVALID and "redis://" in err.value.hint

    async def go():
        lim = SharedRateLimiter("redis://user:s3cret@127.0.0.1:1/0")
        try:
            await lim.check()
        finally:
            await lim.close()

    with pytest.raises(ServingError) as err:
        _run(go())
    assert "s3cret" not in str(err.value) and "127.0.0.1:1" in err.value.message


def test_redact():
    assert redact("redis://u:pw@h:6379/0") == "redis://u:***@h:6379/0"
    assert redact("redis://h:6379/0") == "redis://h:6379/0"


def _middleware_on(url: str, failure: str, store_path):
    """The tenancy middleware with its limits in Redis at `url`; an ASGI app stands in for vLLM (the
    limiter's answer is under test, not generation). Returns (ask, middleware)."""
    import json

    from prometheus_client import CollectorRegistry

    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.gateway.metrics import ServingMetrics
    from adapterhub_lite.serving.gateway.middleware import TenancyMiddleware
    from adapterhub_lite.tenants.store import TenantStore

    store = TenantStore.open(store_path)
    _, key = store.add_tenant("acme", base_access=True, requests_per_minute=1000)

    async def vllm(scope, receive, send):
        body = json.dumps({"choices": [{"text": "ok"}], "usage": {"prompt_tokens": 1}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    config = ServingConfig(admin_key="admin", warmup=False, served_name="base", rate_limit_url=url,
                           rate_limit_failure=failure)
    mw = TenancyMiddleware(vllm, config=config, store=store, metrics=ServingMetrics(CollectorRegistry()))
    from gateway_client import asker

    ask = asker(mw, key)

    return ask, mw


@pytest.mark.parametrize("failure", ["open", "closed"])
def test_redis_unreachable_through_the_middleware(own_redis, tmp_path, caplog, failure):
    """Redis stopped under a serving middleware: `open` admits every request with one warning for the
    whole outage, `closed` answers each with 503 + Retry-After; never a 500; both admit again after the
    restart."""
    import logging

    ask, mw = _middleware_on(own_redis.url, failure, tmp_path / "t.db")

    async def run():
        seen = {"up": [await ask()]}
        own_redis.stop()
        try:
            with caplog.at_level(logging.WARNING):
                seen["down"] = [await ask() for _ in range(5)]
        finally:
            own_redis.start()
        seen["up again"] = [await ask()]
        if mw._sweeper is not None:
            mw._sweeper.cancel()
        await mw.limiter.close()
        return seen

    seen = asyncio.run(run())
    assert [s for s, _ in seen["up"] + seen["up again"]] == [200, 200]
    down = [s for s, _ in seen["down"]]
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    if failure == "open":
        assert down == [200] * 5 and len(unreachable) == 1, (down, [r.getMessage() for r in unreachable])
    else:
        assert down == [503] * 5, down
        assert all(int(headers[b"retry-after"]) >= 1 for _, headers in seen["down"])
