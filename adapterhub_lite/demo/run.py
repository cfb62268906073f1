"""`run_demo`: the five steps in order, each printed as it goes, and the summary at the end."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapterhub_lite.atomic import write_json
from adapterhub_lite.base import EMBEDDED_BASE_DIR, EMBEDDED_BASE_NAME, fingerprint
from adapterhub_lite.demo.adapters import TENANTS, publish_adapters, train_adapters
from adapterhub_lite.demo.questions import accuracy, ask, heldout_questions, status_of

Log = Callable[[str], None]

# (tenant, model, task): what step 5 asks, in order.
REQUESTS = [
    ("acme", EMBEDDED_BASE_NAME, "capitals"),  # the base alone, for comparison
    ("acme", "geo", "capitals"),
    ("acme", "animals", "animal-sounds"),
    ("globex", "opposites", "antonyms"),
    ("globex", "acme/animal-sounds@1.0.0", "animal-sounds"),  # shared with globex
]


def _create_tenants(db: Path, log: Log):
    """Make the tenants anew (their keys are shown once); returns (store, {tenant: key})."""
    from adapterhub_lite.tenants.store import TenantStore

    for stale in (db, db.with_suffix(".db-wal"), db.with_suffix(".db-shm")):
        stale.unlink(missing_ok=True)
    store = TenantStore.open(db)
    keys: dict[str, str] = {}
    for tenant, aliases in TENANTS.items():
        # acme may also call the base model itself; globex may not.
        _, keys[tenant] = store.add_tenant(tenant, base_access=tenant == "acme")
        for alias, ref in aliases.items():
            store.set_alias(tenant, alias, ref)
        log(f"  tenant {tenant:<7} key {keys[tenant][:14]}…  aliases {aliases}")
    return store, keys


def _serve_options(workdir: Path, db: Path, pubkey: Path):
    from adapterhub_lite.serving.supervisor.launcher import ServeOptions

    cache = workdir / "cache"
    shutil.rmtree(cache, ignore_errors=True)  # show real pulls from the registry
    return ServeOptions(
        base_dir=str(EMBEDDED_BASE_DIR),
        registry=str(workdir / "registry"),
        tenants_db=str(db),
        cache_dir=str(cache),
        trusted_keys=[str(pubkey)],
        max_lora_rank=16,
        max_loras=4,
        max_cpu_loras=8,
        log_path=str(workdir / "vllm.log"),
    )


def _ask_each_tenant(client: dict, questions: dict, log: Log) -> list[dict]:
    rows = []
    for tenant, model, task in REQUESTS:
        acc, answers = accuracy(client[tenant], model, questions[task])
        _, prompt, want = questions[task][0]
        rows.append({"tenant": tenant, "model": model, "task": task, "exact_match": acc})
        log(
            f"  {tenant:<7} {model:<26} exact match {acc:4.0%}   e.g. {prompt!r} -> {answers[0]!r}"
            f" (want {want.strip()!r})"
        )
    return rows


def _denials(server, client: dict, keys: dict[str, str], questions: dict, log: Log) -> dict[str, int]:
    """What a tenant may not reach, and the HTTP status it gets instead."""
    import httpx
    import openai

    log("  isolation: what a tenant may not reach")
    kind, prompt, _ = questions["capitals"][0]
    globex = client["globex"]
    stranger = openai.OpenAI(base_url=server.url + "/v1", api_key="ahk_wrong", max_retries=0)
    denials = {
        "globex -> acme's alias 'geo'": status_of(lambda: ask(globex, "geo", kind, prompt)),
        "globex -> acme/geo@1.0.0": status_of(lambda: ask(globex, "acme/geo@1.0.0", kind, prompt)),
        "globex -> the base model": status_of(lambda: ask(globex, EMBEDDED_BASE_NAME, kind, prompt)),
        "no key": httpx.post(
            server.url + "/v1/completions", json={"model": "geo", "prompt": "x"}
        ).status_code,
        "wrong key": status_of(lambda: ask(stranger, "geo", kind, prompt)),
        "acme -> /v1/load_lora_adapter": httpx.post(
            server.url + "/v1/load_lora_adapter",
            json={"lora_name": "x", "lora_path": "/tmp"},
            headers={"Authorization": f"Bearer {keys['acme']}"},
        ).status_code,
    }
    for what, status in denials.items():
        log(f"  {what:<34} -> HTTP {status}")
    return denials


def _hot_swap(store, acme, capitals: list, log: Log) -> dict:
    """Promote acme's 'geo' from 1.0.0 to 1.1.0 live, then roll back (the rollout moves it forward)."""
    log("  hot swap: promote acme's 'geo' from 1.0.0 to 1.1.0, no restart")
    before, _ = accuracy(acme, "geo", capitals)
    t0 = time.perf_counter()
    store.set_alias("acme", "geo", "acme/geo@1.1.0")
    accuracy(acme, "geo", capitals[:1])
    swap_s = time.perf_counter() - t0
    after, _ = accuracy(acme, "geo", capitals)
    log(f"  geo exact match {before:.0%} -> {after:.0%}; first 1.1.0 answer {swap_s:.2f} s after promote")
    store.set_alias("acme", "geo", "acme/geo@1.0.0")
    rolled, _ = accuracy(acme, "geo", capitals)
    log(f"  rollback (same command): exact match {rolled:.0%}")
    return {"before": before, "after": after, "rollback": rolled, "promote_to_first_token_s": swap_s}


def _rollouts(store, server, acme, capitals: list, log: Log) -> dict:
    """A gated rollout of acme's 'geo' to 1.1.0 that advances on its own to 100%, then one back to the
    worse 1.0.0 that the evaluation gate refuses before any traffic."""
    import asyncio

    from adapterhub_lite.serving import rollout_ops
    from adapterhub_lite.serving.rollout_eval import Example
    from adapterhub_lite.tenants.rollout_store import RolloutStore

    rollouts = RolloutStore(store)
    held_out = [Example(prompt=p, completion=want) for _, p, want in capitals]

    def start(ref: str):
        r = rollout_ops.start(
            rollouts, "acme", "geo", ref, steps="50", margin=0.0, actor="demo", interval=1, examples=held_out
        )
        return asyncio.run(
            rollout_ops.run_gate(
                rollouts,
                r,
                server_url=server.url,
                admin_key=server.admin_key,
                examples=held_out,
                actor="demo",
            )
        )

    log("  rollout: acme's 'geo' to 1.1.0, 50% then 100%, a step every second once its gates pass")
    r = start("acme/geo@1.1.0")
    log(f"    {rollouts.latest('acme', 'geo')[1]['reason']}")
    t0, sent = time.perf_counter(), 0
    # Callers keep asking (each with its own `user`, so each sticks to one version); the server's
    # scheduler advances the step once it has seen enough answers of both versions, and promotes.
    while r.active and time.perf_counter() - t0 < 120:
        acme.completions.create(
            model="geo",
            prompt=capitals[sent % len(capitals)][1],
            max_tokens=4,
            temperature=0,
            user=f"u{sent}",
        )
        sent += 1
        if sent % 5 == 0:
            r, _ = rollouts.latest("acme", "geo")
    good = {"state": r.state.value, "requests": sent, "seconds": round(time.perf_counter() - t0, 1)}
    good["alias"] = store.aliases("acme")["geo"]
    log(f"    {good['state']} after {sent} requests in {good['seconds']} s; geo -> {good['alias']}")

    log("  rollout: acme's 'geo' back to the worse 1.0.0")
    bad = start("acme/geo@1.0.0")
    _, result = rollouts.latest("acme", "geo")
    log(f"    {result['reason']}; {bad.state.value}, geo stays {store.aliases('acme')['geo']}")
    trail = [(e.action, e.actor) for e in rollouts.history("acme", "geo") if e.rollout is not None]
    log(f"  audit trail of 'geo': {', '.join(a for a, _ in trail)}")
    return {
        "good": good,
        "refused": {"state": bad.state.value, "eval": result},
        "trail": [{"action": a, "actor": who} for a, who in trail],
    }


def _log_summary(summary: dict, metrics: list[str], path: Path, log: Log) -> None:
    swap = summary["hot_swap"]
    log("\nsummary")
    log(f"  {'tenant':<8} {'model':<26} {'task':<14} exact match")
    for r in summary["requests"]:
        log(f"  {r['tenant']:<8} {r['model']:<26} {r['task']:<14} {r['exact_match']:.0%}")
    log(
        f"  hot swap geo 1.0.0 -> 1.1.0: {swap['before']:.0%} -> {swap['after']:.0%}; "
        f"rollback {swap['rollback']:.0%}"
    )
    ro = summary["rollouts"]
    log(
        f"  rollout geo -> 1.1.0: {ro['good']['state']}; rollout geo -> 1.0.0: {ro['refused']['state']} "
        f"by the evaluation gate"
    )
    log("  server metrics (adapterhub_*):")
    for ln in metrics[:20]:
        log(f"    {ln}")
    log(f"done in {summary['wall_seconds']:.0f} s; summary in {path}")


def run_demo(workdir: Path = Path(".adapterhub-demo"), *, method: str = "qlora", log: Log = print) -> dict:
    """Run the whole path and return the summary (also written to `workdir/demo_summary.json`)."""
    import httpx
    import openai

    from adapterhub_lite.serving.supervisor.launcher import VLLMServer

    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    summary: dict[str, Any] = {"base": str(EMBEDDED_BASE_DIR), "base_fingerprint": fingerprint(None)}

    log(f"1/5 train the example adapters on the embedded base ({method})")
    runs = train_adapters(workdir, log, method)
    summary["training"] = {
        ref: json.loads((d / "training_record.json").read_text())["metrics"] for ref, d in runs.items()
    }

    log("2/5 pack, sign and publish them to the registry")
    _, pubkey = publish_adapters(workdir, runs, log)

    log("3/5 create tenants")
    db = workdir / "tenants.db"
    store, keys = _create_tenants(db, log)

    log("4/5 start vLLM with the adapterhub plugin (about a minute on 2 cores)")
    opts = _serve_options(workdir, db, pubkey)
    with VLLMServer(opts) as server:
        log(f"  serving at {server.url} (log: {opts.log_path})")
        client = {
            t: openai.OpenAI(base_url=server.url + "/v1", api_key=k, max_retries=0) for t, k in keys.items()
        }

        log("5/5 requests as each tenant, with the official openai client")
        questions = {task: heldout_questions(task) for task in ("capitals", "animal-sounds", "antonyms")}
        summary["requests"] = _ask_each_tenant(client, questions, log)
        summary["denials"] = _denials(server, client, keys, questions, log)
        summary["globex_models"] = [m.id for m in client["globex"].models.list().data]
        log(f"  globex's /v1/models: {summary['globex_models']}")
        summary["hot_swap"] = _hot_swap(store, client["acme"], questions["capitals"], log)
        summary["rollouts"] = _rollouts(store, server, client["acme"], questions["capitals"], log)

        metrics = httpx.get(
            server.url + "/metrics", headers={"Authorization": f"Bearer {server.admin_key}"}
        ).text
        ours = [ln for ln in metrics.splitlines() if ln.startswith("adapterhub_") and "_created{" not in ln]

    summary["wall_seconds"] = round(time.time() - t_start, 1)
    path = workdir / "demo_summary.json"
    write_json(path, summary)
    _log_summary(summary, ours, path, log)
    return summary
