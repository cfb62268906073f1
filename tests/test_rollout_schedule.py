"""Steps on a schedule and the p95-latency gate, through the gateway's rollout router and scheduler
against a real tenant store (SQLite file). Each "replica" is a RolloutRouter with its own connection to
the store, as each gateway process holds one; answers are fed through the router's observing send (a
stand-in for vLLM's answer: the same path a real answer takes, test_rollout_vllm.py runs it for real).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from adapterhub_lite.serving.gateway.rollout_router import RolloutRouter
from adapterhub_lite.serving.gateway.rollout_schedule import Scheduler
from adapterhub_lite.tenants.rollout import GateSettings, State, bucket
from adapterhub_lite.tenants.store import TenantStore
from adapterhub_lite.tenants.view import Target

V1, V2 = "acme/bot@1.0.0", "acme/bot@2.0.0"
NOWHERE = {"server": ("127.0.0.1", 9)}  # the discard port: an evaluation gate sent here cannot run


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "t.db"
    store = TenantStore.open(path)
    store.add_tenant("acme")
    store.set_alias("acme", "bot", V1)
    yield path
    store.close()


def _users(rollout_id: int, percent: int, n: int, candidate: bool) -> list[str]:
    """`n` caller keys that the split sends to the candidate (or to the current version)."""
    out, i = [], 0
    while len(out) < n:
        user = f"user-{i}"
        if (bucket(rollout_id, user) < percent) == candidate:
            out.append(user)
        i += 1
    return out


async def _answer(router: RolloutRouter, user: str, delay_s: float = 0.0, ok: bool = True) -> str:
    """One request of the alias through the router: routed, answered after `delay_s`, observed."""
    target, rollout = await router.route_fresh("acme", "bot", Target(V1, True), {"user": user}, [])

    async def sink(message) -> None:
        pass

    send = router.observe(sink, target, rollout)
    await send({"type": "http.response.start", "status": 200 if ok else 500, "headers": []})
    await asyncio.sleep(delay_s)
    body = json.dumps({"choices": [{"text": "fine"}]}).encode()
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return target.name


def test_two_replicas_advance_a_due_step_exactly_once(db):
    replicas = [RolloutRouter(TenantStore.open(db), GateSettings(min_sample=5)) for _ in range(2)]
    store = replicas[0].rollouts
    r = store.start("acme", "bot", V2, steps="10,50,100", interval_s="1s")
    r = store.record_eval("acme", "bot", r.id, True, {}, actor="cli")
    schedulers = [Scheduler(router, NOWHERE, None) for router in replicas]

    async def run() -> list:
        for router in replicas:  # each replica sees the minimum sample of candidate answers
            for user in _users(r.id, 10, 5, candidate=True) + _users(r.id, 10, 5, candidate=False):
                await _answer(router, user)
        early = [await s.tick(now=r.step_started + 0.5) for s in schedulers]
        assert early == [[], []]  # the step has not lasted its interval yet
        due = r.step_started + 1.0
        tasks = [t for s in schedulers for t in await s.tick(now=due)]
        assert len(tasks) == 2  # both replicas decided, from the same view, that the step is over
        return await asyncio.gather(*tasks)

    results = asyncio.run(run())
    assert sorted(x is None for x in results) == [False, True]  # one advanced, one found it moved
    latest, _ = store.latest("acme", "bot")
    assert (latest.state, latest.step, latest.percent) == (State.CANARY, 1, 50)
    steps = [e for e in store.history("acme", "bot") if e.action == "step"]
    assert len(steps) == 1 and steps[0].actor == "schedule" and "lasted 1 s" in steps[0].reason
    assert steps[0].detail["gates"]["candidate"]["requests"] == 5


def test_a_due_step_waits_for_the_minimum_sample_then_the_last_step_promotes(db):
    router = RolloutRouter(TenantStore.open(db), GateSettings(min_sample=5))
    store = router.rollouts
    r = store.start("acme", "bot", V2, steps="50", interval_s=1)
    r = store.record_eval("acme", "bot", r.id, True, {}, actor="cli")
    scheduler = Scheduler(router, NOWHERE, None)
    cand = _users(r.id, 50, 5, candidate=True)
    later = r.step_started + 3600

    async def run() -> None:
        for user in cand[:4]:
            await _answer(router, user)
        assert await scheduler.tick(now=later) == []  # 4 < the minimum sample: no evidence yet
        await _answer(router, cand[4])
        await asyncio.gather(*await scheduler.tick(now=later))

    asyncio.run(run())
    latest, _ = store.latest("acme", "bot")
    assert latest.state is State.PROMOTED and router.rollouts.tenants.aliases("acme")["bot"] == V2
    assert [e.action for e in store.history("acme", "bot")][-1] == "promoted"


def test_a_step_whose_evaluation_gate_cannot_run_is_rolled_back_with_why(db):
    router = RolloutRouter(TenantStore.open(db), GateSettings(min_sample=5))
    store = router.rollouts
    held_out = [{"prompt": "the river", "completion": " flows"}]
    r = store.start("acme", "bot", V2, steps="10,100", interval_s=1, eval_set=held_out)
    r = store.record_eval("acme", "bot", r.id, True, {}, actor="cli")
    scheduler = Scheduler(router, NOWHERE, "admin-secret")

    async def run() -> list[str]:
        for user in _users(r.id, 10, 5, candidate=True):
            await _answer(router, user)
        await asyncio.gather(*await scheduler.tick(now=r.step_started + 1))
        return [await _answer(router, user) for user in _users(r.id, 10, 20, candidate=True)]

    assert set(asyncio.run(run())) == {V1}  # rolled back here at once: no candidate request after
    latest, result = store.latest("acme", "bot")
    assert latest.state is State.ROLLED_BACK
    last = store.history("acme", "bot")[-1]
    assert (last.action, last.actor) == ("rolled-back", "schedule")
    assert last.reason.startswith("step 1: evaluation gate could not run")
    assert last.detail["eval"]["passed"] is False


def test_a_slower_candidate_fails_the_p95_gate_through_the_router(db):
    # Current answers at once, the candidate after 0.3 s: with a 0.05 s slack, the gate allows
    # p95 <= 1.5 x (about 0.001 s) + 0.05 s, far under 0.3 s; and 0.3 s cannot be missed by a slow
    # event loop, which only adds time to the candidate's answers.
    settings = GateSettings(min_sample=5, latency_min_sample=5, p95_margin=1.5, p95_slack_s=0.05)
    router = RolloutRouter(TenantStore.open(db), settings)
    store = router.rollouts
    r = store.start("acme", "bot", V2, steps="50")
    r = store.record_eval("acme", "bot", r.id, True, {}, actor="cli")
    scheduler = Scheduler(router, NOWHERE, None)
    cand, cur = _users(r.id, 50, 5, candidate=True), _users(r.id, 50, 5, candidate=False)

    async def run() -> list[str]:
        t0 = time.monotonic()
        refs = await asyncio.gather(
            *(_answer(router, u, 0.3) for u in cand), *(_answer(router, u) for u in cur)
        )
        assert time.monotonic() - t0 < 30
        assert set(refs[:5]) == {V2} and set(refs[5:]) == {V1}
        await scheduler.tick()  # the latency gate runs on the tick, not on every answer
        await asyncio.gather(*router._tasks)
        return [await _answer(router, u) for u in cand]

    assert set(asyncio.run(run())) == {V1}
    latest, _ = store.latest("acme", "bot")
    assert latest.state is State.ROLLED_BACK
    last = store.history("acme", "bot")[-1]
    assert last.actor == "gate" and "p95 latency" in last.reason
    assert last.detail["gates"]["candidate"]["p95_s"] >= 0.3
