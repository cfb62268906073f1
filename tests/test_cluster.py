"""Replicas on Ray Serve: adapter affinity, tenancy on every path, promotion everywhere, faults.

Two real vLLM CPU replicas (each with the plugin and tenancy) under a real local Ray Serve instance,
talked to with the official openai client through the ingress, and directly. The tenant store and the
registry index are on a throwaway PostgreSQL server (`pg_server`), limits on a throwaway Redis, as on
more than one machine. Faults: PostgreSQL stopped and started again under load, a replica's vLLM
killed under load, a replica's actor process killed outright.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPT = [5, 120, 240, 360, 480, 600]
N_TOKENS = 6
REPLICA_HEADER = "x-adapterhub-replica"
RPM = 4  # the limited tenant's requests a minute: one refills every 15 s


def _adapters(base: Path, out: Path, seeds: dict[str, int]) -> tuple[dict[str, Path], dict[str, list[int]]]:
    """Plain-peft adapters with large random weights, and each one's greedy tokens offline."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def greedy(model) -> list[int]:
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            for _ in range(N_TOKENS):
                ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
        return ids[0, len(PROMPT) :].tolist()

    dirs, expected = {}, {}
    for name, seed in seeds.items():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        peft_model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        )
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        expected[name] = greedy(peft_model.eval())
        dirs[name] = out / name
        peft_model.save_pretrained(dirs[name])
    return dirs, expected


@pytest.fixture(scope="module")
def cluster_pg():
    """The cluster's own PostgreSQL: the outage test stops it (the session's server is never stopped)."""
    from pg_server import running_postgres

    with running_postgres() as server:
        yield server


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, redis_server, cluster_pg):
    from adapterhub_lite.base import EMBEDDED_BASE_DIR
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.cluster.launch import Cluster, ClusterOptions
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.supervisor import ServeOptions
    from adapterhub_lite.serving.supervisor.launcher import free_port
    from adapterhub_lite.tenants import TenantStore

    root = tmp_path_factory.mktemp("cluster")
    tenants_url, registry_url = cluster_pg.new_database(), cluster_pg.new_database()
    dirs, expected = _adapters(EMBEDDED_BASE_DIR, root / "adapters", {"a": 11, "b": 12, "c": 13, "a2": 14})
    reg = open_registry(registry_url, blobs=str(root / "blobs"))
    refs = {}
    for key, (name, version) in {
        "a": ("a", "1.0.0"),
        "b": ("b", "1.0.0"),
        "c": ("c", "1.0.0"),
        "a2": ("a", "2.0.0"),
    }.items():
        bundle = pack_bundle(
            dirs[key],
            root / "bundles" / key,
            namespace="acme",
            name=name,
            version=version,
            base_dir=EMBEDDED_BASE_DIR,
        )
        refs[key] = reg.publish(bundle).ref
    store = TenantStore.open(tenants_url)
    _, acme = store.add_tenant("acme", base_access=True)
    _, globex = store.add_tenant("globex")
    _, limited = store.add_tenant("limited", base_access=True, requests_per_minute=RPM)
    for alias in ("a", "b", "c"):
        store.set_alias("acme", alias, refs[alias])
    serve_opts = ServeOptions(
        base_dir=str(EMBEDDED_BASE_DIR),
        served_name="base",
        registry=registry_url,
        tenants_db=tenants_url,
        cache_dir=str(root / "cache"),
        max_loras=2,
        max_cpu_loras=4,
        max_loaded=2,
        max_lora_rank=16,
        max_model_len=256,
        rate_limit_url=redis_server.url,
    )
    opts = ClusterOptions(serve=serve_opts, replicas=2, port=free_port(), state_dir=str(root / "state"))
    with Cluster(opts) as running:
        yield {
            "cluster": running,
            "keys": {"acme": acme, "globex": globex, "limited": limited},
            "refs": refs,
            "expected": expected,
            "store": store,
        }


def _complete(url: str, key: str, model: str) -> tuple[list[int] | None, str | None, int]:
    """(greedy token ids, replica id, status) of one completion through `url`."""
    r = httpx.post(
        url + "/v1/completions",
        headers={"authorization": f"Bearer {key}"},
        json={
            "model": model,
            "prompt": PROMPT,
            "max_tokens": N_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
            "logprobs": 0,
        },
        timeout=300,
    )
    if r.status_code != 200:
        return None, r.headers.get(REPLICA_HEADER), r.status_code
    tokens = [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]
    return tokens, r.headers.get(REPLICA_HEADER), 200


def test_each_adapter_sticks_to_one_replica_and_is_served_right(cluster):
    url, key, expected = cluster["cluster"].url, cluster["keys"]["acme"], cluster["expected"]
    for alias in ("a", "b", "c"):  # first use: each adapter lands somewhere and the router learns where
        assert _complete(url, key, alias)[2] == 200
    # Replicas report what they hold to the router every few seconds: wait until each alias was answered
    # twice in a row by one replica (the router has learned), then require it for three more rounds.
    last: dict[str, list[str | None]] = {alias: [] for alias in ("a", "b", "c")}
    deadline = time.monotonic() + 60
    while not all(len(r) >= 2 and r[-1] == r[-2] for r in last.values()):
        assert time.monotonic() < deadline, f"the router never settled in 60 s: {last}"
        for alias in ("a", "b", "c"):
            last[alias].append(_complete(url, key, alias)[1])
    seen: dict[str, set[str]] = {}
    for _ in range(3):
        for alias in ("a", "b", "c"):
            tokens, replica, status = _complete(url, key, alias)
            assert status == 200 and tokens == expected[alias]
            seen.setdefault(alias, set()).add(replica)
    assert all(len(replicas) == 1 for replicas in seen.values()), seen


def test_the_openai_client_works_through_the_ingress(cluster):
    client = openai.OpenAI(base_url=cluster["cluster"].url + "/v1", api_key=cluster["keys"]["acme"])
    out = client.completions.create(model="b", prompt=PROMPT, max_tokens=N_TOKENS, temperature=0)
    assert out.choices[0].text
    chunks = list(
        client.completions.create(model="b", prompt=PROMPT, max_tokens=N_TOKENS, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text


def test_tenancy_fails_closed_through_the_ingress_and_directly(cluster):
    running, keys = cluster["cluster"], cluster["keys"]
    assert _complete(running.url, "ahk_not-a-key", "a")[2] == 401
    assert _complete(running.url, keys["globex"], "a")[2] == 404
    assert _complete(running.url, keys["globex"], cluster["refs"]["a"])[2] == 404
    for replica in _both_replicas(running):
        assert _complete(replica["url"], "ahk_not-a-key", "a")[2] == 401
        assert _complete(replica["url"], keys["globex"], "a")[2] == 404
        metrics = httpx.get(replica["url"] + "/metrics", timeout=30)
        assert metrics.status_code in (401, 403)
        metrics = httpx.get(
            replica["url"] + "/metrics", headers={"authorization": f"Bearer {running.admin_key}"}, timeout=30
        )
        assert metrics.status_code == 200 and "adapterhub_requests" in metrics.text


def test_promote_is_seen_by_every_replica(cluster):
    url, key, store = cluster["cluster"].url, cluster["keys"]["acme"], cluster["store"]
    store.set_alias("acme", "a", cluster["refs"]["a2"])
    try:
        for _ in range(4):
            tokens, _, status = _complete(url, key, "a")
            assert status == 200 and tokens == cluster["expected"]["a2"]
        for replica in _both_replicas(cluster["cluster"]):  # directly, too: no replica serves the old version
            tokens, _, status = _complete(replica["url"], key, "a")
            assert status == 200 and tokens == cluster["expected"]["a2"]
    finally:
        store.set_alias("acme", "a", cluster["refs"]["a"])


def _both_replicas(running) -> list[dict]:
    """The two replicas' records, waiting while one is being replaced (Ray's health checks)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        replicas = running.replicas()
        if len(replicas) >= 2:
            return replicas[:2]
        time.sleep(2)
    raise AssertionError(f"expected 2 replicas, found {running.replicas()}")


def test_a_rate_limit_is_one_bucket_across_replicas(cluster):
    """N requests a minute across two replicas is N successes, not 2N (limits shared through Redis)."""
    replicas, key = _both_replicas(cluster["cluster"]), cluster["keys"]["limited"]
    start = time.monotonic()
    statuses = [_complete(replicas[i % 2]["url"], key, "base")[2] for i in range(3 * RPM)]
    elapsed = time.monotonic() - start
    ok = statuses.count(200)
    assert RPM <= ok <= RPM + int(elapsed * RPM / 60.0), statuses
    assert set(statuses) == {200, 429}


def _request(url: str, key: str, model: str) -> dict:
    """One completion; what a client sees of it (status, Retry-After, body, tokens, seconds)."""
    start = time.monotonic()
    r = httpx.post(
        url + "/v1/completions",
        headers={"authorization": f"Bearer {key}"},
        json={
            "model": model,
            "prompt": PROMPT,
            "max_tokens": N_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
            "logprobs": 0,
        },
        timeout=120,
    )
    tokens = None
    if r.status_code == 200:
        tokens = [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]
    return {
        "status": r.status_code,
        "retry_after": r.headers.get("retry-after"),
        "body": r.text,
        "tokens": tokens,
        "seconds": time.monotonic() - start,
        "model": model,
    }


def test_a_database_outage_under_load_answers_503_then_recovers(cluster, cluster_pg):
    """PostgreSQL (tenant store and registry, the cluster's own server) stopped under load: every
    request sent once the stop has returned and the change feeds have noticed (two polls) answers a
    clean 503 + Retry-After, never a 200 from memory, and none hangs; started again: every target
    serves again, none of them restarted."""
    from adapterhub_lite.db.changes import POLL_S

    running, key, expected = cluster["cluster"], cluster["keys"]["acme"], cluster["expected"]
    replicas = _both_replicas(running)
    before = {r["replica"]: r["vllm_pid"] for r in replicas}
    targets = [running.url] + [r["url"] for r in replicas]  # through the ingress, and each replica
    notice_s = 2 * POLL_S  # each process's feed: woken by the server's goodbye, at worst its next probe
    phase = ["up"]
    stopped_at = [float("inf")]
    seen: list[tuple[str, float, dict]] = []  # (phase, sent after the stop returned, answer)
    stop = threading.Event()

    def load(offset: int) -> None:
        n = offset
        while not stop.is_set():
            start = time.monotonic()
            try:
                answer = _request(targets[n % len(targets)], key, "abc"[n % 3])
            except httpx.HTTPError as exc:  # a hang past the client's timeout, or a dropped connection
                answer = {"status": type(exc).__name__, "seconds": time.monotonic() - start}
            seen.append((phase[0], start - stopped_at[0], answer))
            n += 1

    def wait_for(what: str, condition, limit: float) -> None:
        deadline = time.monotonic() + limit
        while not condition():
            got = [a["status"] for *_, a in seen]
            assert time.monotonic() < deadline, f"{what}: not within {limit} s: {got}"
            time.sleep(0.05)

    def settled() -> list[dict]:
        return [a for p, sent, a in seen if p == "down" and sent >= notice_s]

    workers = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    stopped = False
    try:
        # Under load: every target answered at least once before the stop.
        wait_for("load", lambda: sum(a["status"] == 200 for *_, a in seen) >= len(targets), 300)
        cluster_pg.stop()
        stopped, phase[0], stopped_at[0] = True, "down", time.monotonic()
        # Down long enough for every target to be asked a few times once the feeds have noticed.
        wait_for("answers while down", lambda: len(settled()) >= 4 * len(targets), 120)
        phase[0] = "restarting"
        cluster_pg.start()
        stopped = False
        restarted = time.monotonic()
        phase[0] = "up again"
        # Recovered: every target answers right, twice in a row, without any replica being restarted.
        ok = {url: 0 for url in targets}
        while min(ok.values()) < 2:
            assert time.monotonic() - restarted < 60, f"not recovered 60 s after the restart: {ok}"
            for url in targets:
                answer = _request(url, key, "a")
                ok[url] = ok[url] + 1 if answer["status"] == 200 else 0
        recovered_in = time.monotonic() - restarted
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=300)
        if stopped:
            cluster_pg.start()
    statuses = [a["status"] for *_, a in seen]
    assert set(statuses) <= {200, 503}, statuses  # never a 500, never a 404 for an adapter that exists
    down = settled()
    assert down and all(a["status"] == 503 for a in down), [a["status"] for a in down]  # not from memory
    for _, _, answer in seen:
        # Bounded: a stopped server refuses at once; 30 s covers a slow answer on two loaded cores.
        assert answer["seconds"] < 30, answer
        if answer["status"] == 200:
            assert answer["tokens"] == expected[answer["model"]]
        else:
            assert answer["retry_after"] and int(answer["retry_after"]) >= 1, answer
            error = json.loads(answer["body"])["error"]  # a JSON error, never a traceback ...
            assert "Traceback" not in answer["body"] and error["message"]
            assert str(cluster_pg.port) not in answer["body"]  # ... nor where the database is
    assert {r["replica"]: r["vllm_pid"] for r in running.replicas()} == before
    assert all(_alive(pid) for pid in before.values())
    print(f"recovered {recovered_in:.1f} s after PostgreSQL restarted; {statuses.count(503)} 503s, "
          f"{len(down)} asked once the feeds had noticed")


def _ask(url: str, key: str, alias: str) -> dict:
    """One non-stream completion under load, never raising: what came back, and when it was sent and
    answered (a dropped connection is recorded by its exception's name, to be counted, not ignored)."""
    sent = time.monotonic()
    answer = {"alias": alias, "tokens": None, "replica": None, "retry_after": None, "sent": sent}
    try:
        r = httpx.post(
            url + "/v1/completions",
            headers={"authorization": f"Bearer {key}"},
            json={"model": alias, "prompt": PROMPT, "max_tokens": N_TOKENS, "temperature": 0,
                  "ignore_eos": True, "return_tokens_as_token_ids": True, "logprobs": 0},
            timeout=300,
        )
    except httpx.HTTPError as exc:
        return {**answer, "status": type(exc).__name__, "answered": time.monotonic()}
    answer.update(status=r.status_code, replica=r.headers.get(REPLICA_HEADER),
                  retry_after=r.headers.get("retry-after"), answered=time.monotonic())
    if r.status_code == 200:
        answer["tokens"] = [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]
    return answer


def _open_stream(url: str, key: str, model: str) -> tuple[httpx.Client, httpx.Response, Any, list]:
    """A long greedy stream through `url`, read up to its first event (so it has started answering)."""
    client = httpx.Client(timeout=300)
    request = client.build_request(
        "POST",
        url + "/v1/completions",
        headers={"authorization": f"Bearer {key}"},
        json={"model": model, "prompt": PROMPT, "max_tokens": 240, "temperature": 0, "ignore_eos": True,
              "stream": True, "return_tokens_as_token_ids": True, "logprobs": 0},
    )
    response = client.send(request, stream=True)
    assert response.status_code == 200, response.read()
    events: list[dict | str] = []
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: "):
            events.append(json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]")
            break
    return client, response, lines, events  # the rest of `lines` is read after the kill


def test_a_replica_killed_under_load_fails_cleanly_and_comes_back(cluster):
    """kill -9 of a replica's vLLM while requests are in flight on it: a stream that had started ends with
    an OpenAI-style error event (not a dropped connection, not [DONE]) after only the adapter's own
    tokens; every other request ends with the adapter's own answer or a clean 503 with Retry-After,
    never a dropped connection or another adapter's answer; Ray's health check replaces the replica
    (required, within 15 minutes, the load stopped once requests sent after the kill have ended) and
    every adapter is served again."""
    running, key, expected = cluster["cluster"], cluster["keys"]["acme"], cluster["expected"]
    before = {r["replica"]: r for r in _both_replicas(running)}
    results: list[dict] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            for alias in ("a", "b", "c"):
                results.append(_ask(running.url, key, alias))

    workers = [threading.Thread(target=load, name=f"load-{i}") for i in range(2)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 300
        while sum(1 for r in results if r["status"] == 200) < 3:  # answers are flowing: load, not idle
            assert time.monotonic() < deadline, f"no answers under load: {results[-5:]}"
            time.sleep(0.05)
        # The victim is the replica this stream is on, read from the stream's own answer.
        client, stream, lines, events = _open_stream(running.url, key, "a")
        victim = before[stream.headers[REPLICA_HEADER]]
        killed = time.monotonic()
        os.kill(victim["vllm_pid"], signal.SIGKILL)
        try:
            for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]")
        finally:
            stream.close()
            client.close()
        # The load goes on past the kill until requests sent after it have ended (cleanly, checked
        # below); then it stops, so the replacement's vLLM is not starved of the 2 cores while it starts.
        deadline = time.monotonic() + 300
        while sum(1 for r in list(results) if r["sent"] > killed) < 6:
            assert time.monotonic() < deadline, f"no answers after the kill: {results[-5:]}"
            time.sleep(0.05)
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=600)
    # Ray's health check replaces the replica, which starts a new vLLM (a minute or two on an idle
    # 2-core machine; 493 s was seen with six test runs at once): 900 s fails only one that never comes.
    deadline = time.monotonic() + 900
    while True:
        now = {r["replica"] for r in running.replicas()}
        if len(now) == 2 and victim["replica"] not in now:
            break
        assert time.monotonic() < deadline, f"the killed replica was not replaced: {now}"
        time.sleep(2)
    replaced = time.monotonic()

    # The stream: started on the victim, ended by an error event after the adapter's own tokens only.
    assert events and events[-1] != "[DONE]" and "error" in events[-1], events[-3:]
    assert events[-1]["error"]["code"] == 503 and "retry" in events[-1]["error"]["message"]
    streamed = [int(t.split(":")[1]) for e in events[:-1] for t in e["choices"][0]["logprobs"]["tokens"]]
    assert streamed[: N_TOKENS] == expected["a"][: len(streamed)], streamed[:N_TOKENS]
    assert len(streamed) < 240, "the stream finished before the kill: nothing was proven"
    # Everything else: the right answer or a clean 503; requests were in flight when the kill came.
    assert results, "no request completed"
    assert any(r["sent"] < killed < r["answered"] for r in results), "no request was in flight at the kill"
    for r in results:
        assert r["status"] in (200, 503), r  # a dropped connection or a 502 is no clean failure
        if r["status"] == 200:
            assert r["tokens"] == expected[r["alias"]], r  # never another adapter's answer
        else:
            assert r["retry_after"] and int(r["retry_after"]) >= 1, r
    crossing = [r for r in results if r["sent"] < killed < r["answered"]]
    print(
        f"kill -9 under load: {len(results)} answers, {sum(r['status'] == 503 for r in results)} 503s; "
        f"{len(crossing)} in flight at the kill ({sum(r['status'] == 200 for r in crossing)} answered 200); "
        f"replaced in {replaced - killed:.0f} s"
    )
    after = {}
    for alias in ("a", "b", "c"):  # every adapter is served again, by whichever replica holds it
        tokens, replica, status = _complete(running.url, key, alias)
        assert status == 200 and tokens == expected[alias]
        after[alias] = replica
    assert set(after.values()) <= {r["replica"] for r in running.replicas()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_replica_actor_leaves_no_vllm_behind(cluster):
    """kill -9 of a replica's actor process (its `__del__` never runs): its vLLM process group (API
    server, engine core, workers) stops itself, in order, and Ray's replacement serves."""
    from adapterhub_lite.serving.supervisor.processes import group_pids, shm_segments

    running, key, expected = cluster["cluster"], cluster["keys"]["acme"], cluster["expected"]
    victim = _both_replicas(running)[0]
    vllm_group = victim["vllm_pid"]  # vLLM runs in a session (and process group) of its own
    members = group_pids(vllm_group)
    assert len(members) >= 2, members  # the API server and at least its engine core
    shm = shm_segments(members)
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    while group_pids(vllm_group):
        # Bound: the pidfd wakes the watch at once, then vLLM's own shutdown; past the watch's
        # 30 s grace the group is killed, so 60 s fails only if nothing stopped it.
        assert time.monotonic() - killed < 60, f"orphaned vLLM processes: {group_pids(vllm_group)}"
        time.sleep(0.2)
    gone_in = time.monotonic() - killed
    assert not [p for p in shm if Path(p).exists()]  # stopped in order: its shared memory went with it
    assert victim["replica"] not in {r["replica"] for r in running.replicas()}
    deadline = time.monotonic() + 600
    while True:  # Ray replaces the replica, which starts a new vLLM
        now = running.replicas()
        if len(now) == 2 and victim["replica"] not in {r["replica"] for r in now}:
            break
        assert time.monotonic() < deadline, f"no replacement: {now}"
        time.sleep(2)
    for alias in ("a", "b", "c"):
        tokens, _, status = _complete(running.url, key, alias)
        assert status == 200 and tokens == expected[alias]
    print(f"the killed actor's vLLM group was gone {gone_in:.1f} s after the kill")
