"""The gateway's rollout router against a real tenant store, answers fed through its observing send.
(The same paths against a real vLLM server: test_rollout_vllm.py.)"""

from __future__ import annotations

import asyncio
import json

from adapterhub_lite.serving.gateway.rollout_router import RolloutRouter
from adapterhub_lite.tenants.rollout import ANSWERED_BY_HEADER, GateSettings
from adapterhub_lite.tenants.store import TenantStore
from adapterhub_lite.tenants.view import Target

V1, V2 = "acme/bot@1.0.0", "acme/bot@2.0.0"


def test_a_failing_candidate_gets_no_request_after_the_gate_trips(tmp_path):
    store = TenantStore.open(tmp_path / "t.db")
    store.add_tenant("acme")
    store.set_alias("acme", "bot", V1)
    router = RolloutRouter(store, GateSettings(window_s=60, min_sample=5, max_increase=0.05))
    r = router.rollouts.start("acme", "bot", V2, steps="50")
    router.rollouts.record_eval("acme", "bot", r.id, True, {}, actor="cli")

    async def answer(status: int, text: str) -> tuple[str, list]:
        target, rollout = await router.route_fresh("acme", "bot", Target(V1, True), {}, [])
        sent: list = []

        async def sink(message) -> None:
            sent.append(message)

        send = router.observe(sink, target, rollout)
        ok = target.name == V1
        await send({"type": "http.response.start", "status": 200 if ok else status, "headers": []})
        body = json.dumps({"choices": [{"text": "fine" if ok else text}]}).encode()
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return target.name, sent

    async def run() -> list[str]:
        refs = []
        for _ in range(200):
            ref, sent = await answer(200, "")  # the candidate answers 200 with empty text: a failure
            assert (ANSWERED_BY_HEADER, ref.encode()) in sent[0]["headers"]
            refs.append(ref)
        await asyncio.gather(*router._tasks)  # the rollback's store write
        return refs

    refs = asyncio.run(run())
    to_candidate = [i for i, ref in enumerate(refs) if ref == V2]
    assert len(to_candidate) == 5  # the minimum sample, then not one more
    assert set(refs[to_candidate[-1] + 1 :]) == {V1}
    latest, _ = router.rollouts.latest("acme", "bot")
    assert latest.state.value == "rolled-back"
    event = router.rollouts.history("acme", "bot")[-1]
    assert (event.action, event.actor, event.detail["failed"]) == ("rolled-back", "gate", 5)
    # another gateway (a fresh router on the same store) routes nothing to the candidate either
    other = RolloutRouter(TenantStore.open(tmp_path / "t.db"))
    other.refresh()
    assert {
        other.route("acme", "bot", Target(V1, True), {"user": f"u{i}"}, [])[0].name for i in range(50)
    } == {V1}
