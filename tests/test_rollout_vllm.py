"""Rollouts end to end: a real vLLM server (CPU build) on loopback, the official openai client, real
bundles in a real registry, the CLI and the admin API. One server start covers the checks in order
(they share the alias's history); a restart at the end checks that the state survives it.

Versions of acme's alias `bot`:
- 1.0.0 (current) and 2.0.0: the same adapter weights packed twice (a good candidate: equal on the
  held-out set);
- 3.0.0: other weights (a worse candidate: it does not reproduce 1.0.0's answers);
- 4.0.0: a bundle whose weights blob is corrupted in the registry, so every request that reaches it
  fails with a 500 (a candidate that fails once it takes traffic).
The held-out set is 1.0.0's own greedy answers, so 1.0.0 scores exact match 1.0 on it.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_serving_vllm import _base_dir, _corrupt_blob, _make_adapters
from typer.testing import CliRunner

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

V1, V2, V3, V4 = "acme/bot@1.0.0", "acme/bot@2.0.0", "acme/bot@3.0.0", "acme/bot@4.0.0"
PROMPTS = ["the river", "a small town", "on monday", "she said", "north of the", "the old king"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer
    from adapterhub_lite.tenants import TenantStore

    root = tmp_path_factory.mktemp("rollout")
    base = _base_dir()
    dirs, _ = _make_adapters(base, root / "adapters", {"good": 11, "worse": 12, "broken": 13})
    reg = open_registry(root / "registry")
    for version, key in [("1.0.0", "good"), ("2.0.0", "good"), ("3.0.0", "worse"), ("4.0.0", "broken")]:
        bundle = pack_bundle(
            dirs[key],
            root / "bundles" / version,
            namespace="acme",
            name="bot",
            version=version,
            base_dir=base,
        )
        reg.publish(bundle)
    _corrupt_blob(reg, root / "bundles" / "4.0.0" / "adapter_model.safetensors")
    store = TenantStore.open(root / "tenants.db")
    _, key = store.add_tenant("acme")
    store.set_alias("acme", "bot", V1)
    opts = ServeOptions(
        base_dir=str(base),
        served_name="base",
        registry=str(root / "registry"),
        tenants_db=str(root / "tenants.db"),
        cache_dir=str(root / "cache"),
        max_loras=2,
        max_cpu_loras=4,
        max_loaded=4,
        max_lora_rank=16,
        max_model_len=256,
        log_path=str(root / "vllm.log"),
    )
    server = VLLMServer(opts).start()
    w = {
        "root": root,
        "opts": opts,
        "server": server,
        "key": key,
        "store": store,
        "db": str(root / "tenants.db"),
    }
    w["registry"] = str(root / "registry")
    try:
        yield w
    finally:
        w["server"].stop()


def _client(w) -> openai.OpenAI:
    return openai.OpenAI(base_url=w["server"].url + "/v1", api_key=w["key"], max_retries=0, timeout=120)


def _ask(w, user: str | None = None, headers: dict | None = None) -> tuple[int, str | None, str | None]:
    """One tenant request of the alias: (status, the ref named by the header, the model vLLM answered as)."""
    body = {"model": "bot", "prompt": "the river", "max_tokens": 2, "temperature": 0}
    if user:
        body["user"] = user
    r = httpx.post(
        w["server"].url + "/v1/completions",
        json=body,
        headers={"Authorization": f"Bearer {w['key']}", **(headers or {})},
        timeout=120,
    )
    model = r.json().get("model") if r.status_code == 200 else None
    return r.status_code, r.headers.get("x-adapterhub-adapter"), model


def _admin(w, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(
        method,
        w["server"].url + "/adapterhub/v1/" + path,
        json=body,
        headers={"Authorization": f"Bearer {w['server'].admin_key}"},
        timeout=120,
    )


def _wait(cond, timeout: float = 120.0):
    end = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.1)


def _eval_file(w) -> str:
    """The held-out set: 1.0.0's own greedy answers (through the server, as the admin)."""
    lines = []
    for prompt in PROMPTS:
        r = httpx.post(
            w["server"].url + "/v1/completions",
            json={"model": V1, "prompt": prompt, "max_tokens": 32, "temperature": 0},
            headers={"Authorization": f"Bearer {w['server'].admin_key}"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        lines.append(json.dumps({"prompt": prompt, "completion": r.json()["choices"][0]["text"]}))
    path = w["root"] / "heldout.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _cli(w, monkeypatch, *args: str):
    from cli.main import app

    monkeypatch.setenv("ADAPTERHUB_ADMIN_KEY", w["server"].admin_key)
    return CliRunner().invoke(app, ["tenant", *args, "--db", w["db"]])


def test_worse_candidate_is_refused_by_the_eval_gate_before_any_traffic(world, monkeypatch):
    w = world
    w["eval"] = _eval_file(w)
    r = _cli(
        w,
        monkeypatch,
        "rollout",
        "acme",
        "bot",
        V3,
        "--canary",
        "50",
        "--eval-file",
        w["eval"],
        "--server",
        w["server"].url,
        "--registry",
        w["registry"],
    )
    assert r.exit_code == 1, r.output
    assert "refused" in r.output and "rolled-back" in r.output
    status = json.loads(_cli(w, monkeypatch, "rollout", "status", "acme", "bot", "--json").output)
    assert status["state"] == "rolled-back" and status["eval"]["current"] == 1.0
    assert status["eval"]["candidate"] < 1.0
    assert {_ask(w, user=f"u{i}")[1] for i in range(20)} == {V1}  # no tenant request reached 3.0.0


def test_split_is_binomial_sticky_per_caller_and_advances_to_promotion(world):
    w = world
    examples = [json.loads(x) for x in open(w["eval"]).read().splitlines()]
    r = _admin(w, "POST", "rollouts/acme/bot", {"candidate": V2, "steps": "10,50,100", "eval": examples})
    assert r.status_code == 202, r.text
    state = _wait(
        lambda: (s := _admin(w, "GET", "rollouts/acme/bot").json())["state"] != "pending-eval" and s
    )
    assert state["state"] == "canary" and state["percent"] == 10, state
    assert state["eval"]["passed"] and state["eval"]["candidate"] == state["eval"]["current"] == 1.0

    # Anonymous requests: random split. n=300, p=0.1: the 99% binomial interval is
    # 30 +- 2.576*sqrt(300*0.1*0.9) = 30 +- 13.4, so [17, 43].
    n, p = 300, 0.10
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: _ask(w), range(n)))
    assert all(s == 200 for s, _, _ in answers)
    assert all(ref == model and ref in (V1, V2) for _, ref, model in answers)  # no other version answered
    hits = sum(ref == V2 for _, ref, _ in answers)
    half = 2.576 * math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) <= half, hits

    # A stable caller key (the OpenAI `user` field, or the header) always gets the same version.
    seen = {}
    for i in range(40):
        refs = {_ask(w, user=f"user-{i}")[1] for _ in range(3)}
        assert len(refs) == 1
        seen[f"user-{i}"] = refs.pop()
    assert len({_ask(w, headers={"X-AdapterHub-Caller": "hdr-1"})[1] for _ in range(5)}) == 1

    r = _admin(w, "POST", "rollouts/acme/bot/advance", {"reason": "10% healthy"})
    assert r.status_code == 200 and r.json()["percent"] == 50
    for user, ref in seen.items():
        if ref == V2:  # on the candidate at 10%: still there at 50% (fixed buckets)
            assert _ask(w, user=user)[1] == V2
    assert _admin(w, "POST", "rollouts/acme/bot/advance", {}).json()["percent"] == 100
    assert {_ask(w)[1] for _ in range(10)} == {V2}
    assert _admin(w, "POST", "rollouts/acme/bot/advance", {}).json()["state"] == "promoted"
    assert w["store"].aliases("acme")["bot"] == V2
    assert {_ask(w)[1] for _ in range(5)} == {V2}
    trail = _admin(w, "GET", "history/acme/bot").json()["events"]
    actions = [e["action"] for e in trail]
    assert actions[-5:] == ["started", "eval-passed", "step", "step", "promoted"]
    assert trail[-3]["actor"].startswith("admin:") and trail[-3]["reason"] == "10% healthy"


def test_failing_candidate_is_rolled_back_and_gets_no_further_request(world, monkeypatch):
    w = world
    r = _cli(
        w,
        monkeypatch,
        "rollout",
        "acme",
        "bot",
        V4,
        "--steps",
        "50",
        "--skip-eval",
        "--registry",
        w["registry"],
    )
    assert r.exit_code == 0, r.output
    results = [_ask(w) for _ in range(120)]  # one at a time: the order is the order of answers
    to_candidate = [i for i, (_, ref, _) in enumerate(results) if ref == V4]
    # Every answer of 4.0.0 failed (500); the gate (10 requests minimum, failure rate > current's + 5%)
    # trips on the 10th, and from the next request on nothing reaches 4.0.0.
    assert all(results[i][0] == 500 for i in to_candidate)
    assert len(to_candidate) == 10, to_candidate
    assert all(s == 200 and ref == V2 for s, ref, _ in results[to_candidate[-1] + 1 :])
    assert all(ref in (V2, V4) for _, ref, _ in results)
    state = _wait(lambda: (s := _admin(w, "GET", "rollouts/acme/bot").json())["state"] == "rolled-back" and s)
    assert state["percent"] == 0 and w["store"].aliases("acme")["bot"] == V2
    last = _admin(w, "GET", "history/acme/bot").json()["events"][-1]
    assert last["action"] == "rolled-back" and last["actor"] == "gate" and "10/10" in last["reason"]
    r = _cli(w, monkeypatch, "history", "acme", "bot")
    assert "rolled-back" in r.output and "live gate" in r.output


def test_restarted_server_resumes_the_rollout(world, monkeypatch):
    from adapterhub_lite.serving.supervisor import VLLMServer

    w = world
    r = _cli(
        w,
        monkeypatch,
        "rollout",
        "acme",
        "bot",
        V1,
        "--steps",
        "50",
        "--skip-eval",
        "--registry",
        w["registry"],
    )
    assert r.exit_code == 0, r.output
    before = {f"caller-{i}": _ask(w, user=f"caller-{i}")[1] for i in range(12)}
    assert set(before.values()) == {V1, V2}
    w["server"].stop()
    w["server"] = VLLMServer(w["opts"]).start()
    after = {u: _ask(w, user=u)[1] for u in before}
    assert after == before  # same rollout, same step, same split per caller
    assert _admin(w, "GET", "rollouts").json()["rollouts"][0]["percent"] == 50
    assert _admin(w, "POST", "rollouts/acme/bot/abort", {"reason": "done testing"}).status_code == 200
    assert {_ask(w, user=u)[1] for u in before} == {V2}


def _until_ended(w) -> list[str | None]:
    """Send tenant requests (each caller its own `user`) until the alias's rollout ends; the refs."""
    refs: list[str | None] = []

    def ended() -> bool:
        refs.append(_ask(w, user=f"sched-{len(refs)}")[1])
        return len(refs) % 5 == 0 and _admin(w, "GET", "rollouts/acme/bot").json()["state"] != "canary"

    _wait(ended)
    return refs


def test_steps_advance_on_a_schedule_to_promotion_with_no_operator(world, monkeypatch):
    w = world  # the alias is on 2.0.0; 1.0.0 has the same weights, so it passes the evaluation gate
    r = _cli(w, monkeypatch, "rollout", "acme", "bot", V1, "--steps", "50", "--interval", "1s",
             "--eval-file", w["eval"], "--server", w["server"].url, "--registry", w["registry"])  # fmt: skip
    assert r.exit_code == 0 and "a step every 1 s" in r.output, r.output
    refs = _until_ended(w)
    assert set(refs) <= {V1, V2}
    state = _admin(w, "GET", "rollouts/acme/bot").json()
    assert state["state"] == "promoted" and w["store"].aliases("acme")["bot"] == V1
    last = _admin(w, "GET", "history/acme/bot").json()["events"][-1]
    assert (last["action"], last["actor"]) == ("promoted", "schedule")
    assert last["detail"]["eval"]["passed"] and last["detail"]["eval"]["candidate"] == 1.0
    assert last["detail"]["gates"]["candidate"]["requests"] >= 10  # the minimum sample, on this replica


def test_a_step_reruns_the_evaluation_gate_and_a_worse_candidate_is_rolled_back(world):
    """The start's gate is recorded as passed directly (as if the held-out set had been easier then), so
    what judges 3.0.0 is the gate the scheduler reruns before advancing the step."""
    w = world
    from adapterhub_lite.tenants.rollout_store import RolloutStore

    store = RolloutStore(w["store"])
    held_out = [json.loads(x) for x in open(w["eval"]).read().splitlines()]
    r = store.start("acme", "bot", V3, steps="50,100", interval_s=1, eval_set=held_out)
    store.record_eval("acme", "bot", r.id, True, {"reason": "recorded by the test"}, actor="test")
    refs = _until_ended(w)
    state = _admin(w, "GET", "rollouts/acme/bot").json()
    assert state["state"] == "rolled-back" and state["step"] == 0
    assert w["store"].aliases("acme")["bot"] == V1
    last = _admin(w, "GET", "history/acme/bot").json()["events"][-1]
    assert (last["action"], last["actor"]) == ("rolled-back", "schedule")
    assert last["reason"].startswith("step 1: evaluation gate refused")
    assert last["detail"]["eval"]["candidate"] < last["detail"]["eval"]["current"] == 1.0
    assert V3 in refs and set(refs) <= {V1, V3}
    assert {_ask(w, user=f"sched-{i}")[1] for i in range(len(refs))} == {V1}  # none reach 3.0.0 now
