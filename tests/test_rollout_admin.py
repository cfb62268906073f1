"""The rollout admin routes through the real middleware and a real tenant store; no request reaches vLLM
(none of these routes forwards one), so the inner app is one that fails the test if called. The
routes' effect on live traffic is tested against a real vLLM server in test_rollout_vllm.py."""

from __future__ import annotations

import json

import pytest
from gateway_client import call

from adapterhub_lite.tenants.store import TenantStore

V1, V2 = "acme/bot@1.0.0", "acme/bot@2.0.0"


@pytest.fixture
def mw(tmp_path):
    from prometheus_client import CollectorRegistry

    from adapterhub_lite.serving.config import ServingConfig
    from adapterhub_lite.serving.gateway.metrics import ServingMetrics
    from adapterhub_lite.serving.gateway.middleware import TenancyMiddleware

    store = TenantStore.open(tmp_path / "t.db")
    _, key = store.add_tenant("acme")
    store.set_alias("acme", "bot", V1)

    async def vllm(scope, receive, send):
        raise AssertionError("the request went on to vLLM")

    class NoResolver:
        registry = None

    m = TenancyMiddleware(
        vllm,
        config=ServingConfig(admin_key="admin-secret", warmup=False),
        store=store,
        resolver=NoResolver(),
        metrics=ServingMetrics(CollectorRegistry()),
    )
    m.tenant_key = key
    return m


def _call(mw, method: str, path: str, body: bytes | dict = b"", key: str = "admin-secret"):
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    sent = call(mw, "/adapterhub/v1/" + path, key=key, body=raw, method=method, server=("127.0.0.1", 1))
    return sent[0]["status"], json.loads(sent[1]["body"])


def test_admin_routes_act_on_rollouts_and_show_history(mw):
    store = mw.rollouts.rollouts
    r = store.start("acme", "bot", V2, steps="20,100")
    store.record_eval("acme", "bot", r.id, True, {"reason": "ok"}, actor="cli")
    status, body = _call(mw, "GET", "rollouts")
    assert status == 200 and [x["percent"] for x in body["rollouts"]] == [20]
    status, body = _call(mw, "POST", "rollouts/acme/bot/pause", {"reason": "incident 7"})
    assert (status, body["state"]) == (200, "paused")
    status, body = _call(mw, "POST", "rollouts/acme/bot/advance", {})
    assert status == 409 and "paused" in body["error"]["message"]
    assert _call(mw, "POST", "rollouts/acme/bot/abort", b"")[0] == 200
    status, body = _call(mw, "GET", "rollouts/acme/bot")
    assert (status, body["state"], body["eval"]["reason"]) == (200, "aborted", "ok")
    status, body = _call(mw, "GET", "history/acme/bot")
    last = body["events"][-1]
    assert (last["action"], last["reason"]) == ("aborted", "aborted by operator")
    assert body["events"][-2]["reason"] == "incident 7" and last["actor"].startswith("admin:")
    assert "admin-secret" not in json.dumps(body)  # the key's id, never the key


def test_admin_routes_refuse_bad_requests_with_clear_errors(mw):
    assert _call(mw, "GET", "rollouts", key=mw.tenant_key)[0] == 403  # tenants may not
    assert _call(mw, "GET", "rollouts", key="wrong")[0] == 401
    for method, path, body, code in [
        ("POST", "rollouts/acme/bot/advance", b"{not json", 400),
        ("POST", "rollouts/acme/bot/advance", {"reason": 5}, 400),
        ("POST", "rollouts/acme/bot/advance", {"extra": 1}, 400),
        ("POST", "rollouts/acme/bot/advance", {}, 404),  # no rollout in progress
        ("GET", "rollouts/acme/nope", b"", 404),
        ("POST", "rollouts/acme/bot", {"candidate": V2}, 400),  # neither eval nor skip_eval
        ("POST", "rollouts/acme/bot", {"candidate": V2, "margin": 2, "skip_eval": True}, 400),
        ("POST", "rollouts/acme/bot", {"candidate": V2, "interval": "soon", "skip_eval": True}, 422),
        ("GET", "rollouts/acme/bot/../../x", b"", 404),
        ("GET", "history/" + "a" * 100, b"", 404),
    ]:
        status, answer = _call(mw, method, path, body)
        assert status == code, (path, body, answer)
        assert answer["error"]["message"]
