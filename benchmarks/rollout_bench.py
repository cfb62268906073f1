"""Rollout benchmark on one vLLM server (CPU build) under a closed-loop load of concurrent clients.

- `rollout_over_plain_alias_throughput`: requests/s of an alias under a 50% rollout (two versions with
  the same weights, so the same compute) over requests/s of a plain alias, phases alternated
  (plain, rollout, plain, rollout, ...) and compared by median. Goal >= 0.95.
- `rollback_seconds`: a candidate whose every answer fails (its weights blob is corrupt in the
  registry) is rolled out at 50% under the same load; from the client's receipt of its first failed
  answer to the rollback taking effect: the later of (a) the start of the last request that was
  routed to it and (b) the store recording `rolled-back` (what every other replica reads on its next
  request). Includes the live gate's minimum sample (10 candidate answers) at this load. Goal <= 2 s.
- `promote_under_load_seconds`: under the same load, the admin route that promotes a rollout (advance
  from its last step) timed from the request to its answer (the store has committed; every replica's
  next request routes by it), and to the first answer of a request started after it from the new
  version. Goal <= 2 s.

    .venv/bin/python benchmarks/rollout_bench.py [--clients 4] [--phase-s 10] [--phases 3]
    .venv/bin/python benchmarks/rollout_bench.py --plot-only     # redraw the PNG from the JSON

Writes benchmarks/results/rollout.json and, when matplotlib is installed, rollout.png beside it (the
phases' throughput and each figure against its goal). Run it holding the heavy lock on a shared
machine; timings on a loaded machine are noisy: the JSON records the machine's load average at the start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx  # noqa: E402

V1, V2, V4 = "acme/bot@1.0.0", "acme/bot@2.0.0", "acme/bot@4.0.0"


class Load:
    """`clients` threads sending one short completion of `model` each, back to back."""

    def __init__(self, url: str, key: str, clients: int, model: str = "bot") -> None:
        """`model` may name several aliases separated by commas: client i asks the (i mod n)-th."""
        self.url, self.key, self.clients, self.models = url, key, clients, model.split(",")
        self.records: list[tuple[float, float, int, str | None]] = []  # (start, end, status, ref)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def _run(self, i: int) -> None:
        body = {"model": self.models[i % len(self.models)], "prompt": "the river", "max_tokens": 4}
        body["temperature"] = 0
        with httpx.Client(headers={"Authorization": f"Bearer {self.key}"}, timeout=120) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                r = c.post(self.url + "/v1/completions", json=body)
                rec = (t0, time.monotonic(), r.status_code, r.headers.get("x-adapterhub-adapter"))
                with self._lock:
                    self.records.append(rec)

    def __enter__(self) -> Load:
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.clients)
        ]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def _admin(url: str, admin: str, method: str, path: str, body: dict | None = None) -> httpx.Response:
    return httpx.request(
        method,
        url + "/adapterhub/v1/" + path,
        json=body,
        headers={"Authorization": f"Bearer {admin}"},
        timeout=120,
    )


def _throughput(url: str, key: str, clients: int, model: str, seconds: float) -> float:
    t0 = time.monotonic()
    with Load(url, key, clients, model) as load:
        time.sleep(seconds)  # the phase's length: the measurement is what completed inside it
    done = [r for r in load.records if r[2] == 200 and r[1] - t0 <= seconds]
    return len(done) / seconds


def routing_cost_us(store, n: int = 20000) -> dict:
    """In-process cost per request of the rollout hook (route + the observing send), with and without
    an active rollout: the noise-free part of the throughput comparison."""
    import asyncio

    from adapterhub_lite.serving.gateway.rollout_router import RolloutRouter
    from adapterhub_lite.tenants.view import Target

    router = RolloutRouter(store)
    start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"application/json")],
    }
    body = {"type": "http.response.body", "body": b'{"choices": [{"text": "hello"}]}', "more_body": False}

    async def sink(message) -> None:
        return None

    async def run(model: str) -> float:
        t0 = time.perf_counter()
        for i in range(n):
            target, r = await router.route_fresh("acme", model, Target(V1, True), {"user": f"u{i}"}, [])
            send = router.observe(sink, target, r)
            await send(start)
            await send(body)
        return (time.perf_counter() - t0) / n * 1e6

    return {"plain_alias": asyncio.run(run("plain")), "under_rollout": asyncio.run(run("bot"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--phase-s", type=float, default=10.0)
    ap.add_argument("--phases", type=int, default=3)
    ap.add_argument("--plot-only", action="store_true", help="redraw rollout.png from rollout.json")
    args = ap.parse_args()
    out = ROOT / "benchmarks" / "results" / "rollout.json"
    if args.plot_only:
        plot(json.loads(out.read_text()), out.with_suffix(".png"))
        return

    from serving_load import build_adapters

    from adapterhub_lite.base import EMBEDDED_BASE_DIR
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer
    from adapterhub_lite.tenants import TenantStore
    from adapterhub_lite.tenants.rollout_store import RolloutStore

    load_avg = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="rollout-bench-"))
    base = EMBEDDED_BASE_DIR
    good, broken = build_adapters(base, work / "adapters", 2, 8)
    reg = open_registry(work / "registry")
    for version, adapter in (("1.0.0", good), ("2.0.0", good), ("4.0.0", broken)):
        b = pack_bundle(
            adapter, work / "b" / version, namespace="acme", name="bot", version=version, base_dir=base
        )
        reg.publish(b)
    _corrupt_blob(reg, work / "b" / "4.0.0" / "adapter_model.safetensors")  # every answer of 4.0.0 fails
    store = TenantStore.open(work / "tenants.db")
    _, key = store.add_tenant("acme")
    store.set_alias("acme", "bot", V1)
    store.set_alias("acme", "plain", V1)
    store.set_alias("acme", "plain2", V2)  # with "plain": both versions in the batch, no rollout
    rollouts = RolloutStore(store)
    opts = ServeOptions(
        base_dir=str(base),
        served_name="base",
        registry=str(work / "registry"),
        tenants_db=str(work / "tenants.db"),
        cache_dir=str(work / "cache"),
        max_loras=2,
        max_cpu_loras=4,
        max_loaded=4,
        max_lora_rank=16,
        max_model_len=256,
        log_path=str(work / "vllm.log"),
    )
    server = VLLMServer(opts).start()
    url, admin = server.url, server.admin_key
    result: dict = {}
    try:
        r = rollouts.start("acme", "bot", V2, steps="50,100", actor="bench")
        rollouts.record_eval("acme", "bot", r.id, True, {"reason": "bench: skipped"}, actor="bench")
        result["hook_cost_us"] = routing_cost_us(store)
        for model in ("plain", "plain2", "bot", "bot", "bot"):  # warm: both versions loaded
            httpx.post(
                url + "/v1/completions",
                json={"model": model, "prompt": "x", "max_tokens": 1},
                headers={"Authorization": f"Bearer {key}"},
                timeout=120,
            )
        for model in ("plain", "bot", "plain,plain2"):  # one untimed phase each: the server warms up
            _throughput(url, key, args.clients, model, 2.0)
        plain, rolled, mixed = [], [], []
        for _ in range(args.phases):
            plain.append(_throughput(url, key, args.clients, "plain", args.phase_s))
            rolled.append(_throughput(url, key, args.clients, "bot", args.phase_s))
            mixed.append(_throughput(url, key, args.clients, "plain,plain2", args.phase_s))
        result["plain_alias_rps"] = plain
        result["rollout_rps"] = rolled
        # Half the clients on each version through two plain aliases: the same mix of two adapters in
        # vLLM's batches as a 50% rollout, without the rollout's routing; rollout over this isolates the
        # router's cost from the engine's cost of batching two adapters.
        result["two_plain_aliases_rps"] = mixed
        result["rollout_over_plain_alias_throughput"] = statistics.median(rolled) / statistics.median(plain)
        result["rollout_over_two_plain_aliases_throughput"] = statistics.median(rolled) / statistics.median(
            mixed
        )
        result["two_plain_aliases_over_plain_alias_throughput"] = statistics.median(
            mixed
        ) / statistics.median(plain)
        # What the hook can cost at most, per request, against the measured request time:
        per_request_us = 1e6 * args.clients / statistics.median(plain)
        extra = result["hook_cost_us"]["under_rollout"] - result["hook_cost_us"]["plain_alias"]
        result["hook_bound_throughput_ratio"] = per_request_us / (per_request_us + max(extra, 0.0))

        # promote under load: advance 50 -> 100 -> promoted, the last one timed
        with Load(url, key, args.clients) as load:
            time.sleep(2)
            _admin(url, admin, "POST", "rollouts/acme/bot/advance", {})
            time.sleep(2)
            t0 = time.monotonic()
            resp = _admin(url, admin, "POST", "rollouts/acme/bot/advance", {"reason": "bench"})
            t_answer = time.monotonic()
            assert resp.json()["state"] == "promoted", resp.text
            time.sleep(3)
        after = [rec for rec in load.records if rec[0] >= t_answer]
        first_new = min(rec[1] for rec in after if rec[3] == V2)
        result["promote_under_load_seconds"] = t_answer - t0
        result["promote_to_first_answer_seconds"] = first_new - t0
        result["promote_requests_after_on_old_version"] = sum(rec[3] == V1 for rec in after)

        # rollback of a failing candidate under load
        r = rollouts.start("acme", "bot", V4, steps="50", actor="bench")
        with Load(url, key, args.clients) as load:
            time.sleep(1)
            rollouts.record_eval("acme", "bot", r.id, True, {"reason": "bench: skipped"}, actor="bench")
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                latest, _ = rollouts.latest("acme", "bot")
                if latest.state.value == "rolled-back":
                    t_store = time.monotonic()
                    break
                time.sleep(0.01)
            else:
                raise SystemExit("the live gate did not roll back within 60 s")
            time.sleep(2)
        bad = [rec for rec in load.records if rec[3] == V4]
        first_bad = min(rec[1] for rec in bad)
        last_routed = max(rec[0] for rec in bad)
        result["rollback_seconds"] = max(t_store, last_routed) - first_bad
        result["rollback_candidate_requests"] = len(bad)
        result["rollback_candidate_failures"] = sum(rec[2] >= 500 for rec in bad)
    finally:
        server.stop()

    report = {
        "benchmark": "rollout",
        "command": "benchmarks/rollout_bench.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_at_start": load_avg,
            "python": platform.python_version(),
        },
        "clients": args.clients,
        "phase_s": args.phase_s,
        "goals": {
            "rollback_seconds": "<= 2",
            "rollout_over_plain_alias_throughput": ">= 0.95",
            "promote_under_load_seconds": "<= 2",
        },
        "results": result,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    plot(report, out.with_suffix(".png"))


def plot(report: dict, path: Path) -> None:
    """The phases' throughput (plain alias against the alias under rollout) and the three figures
    against their goals; says so and draws nothing when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4))
    phases = range(1, len(res["plain_alias_rps"]) + 1)
    a1.plot(phases, res["plain_alias_rps"], "o-", label="plain alias")
    a1.plot(phases, res["rollout_rps"], "s-", label="alias under a 50% rollout")
    if "two_plain_aliases_rps" in res:
        a1.plot(phases, res["two_plain_aliases_rps"], "^-", label="two plain aliases, one per version")
    a1.set_xlabel("phase (alternated in this order)")
    a1.set_ylabel("requests/s")
    a1.set_title(f"throughput, {report['clients']} clients, {report['phase_s']:g} s phases")
    a1.set_ylim(bottom=0)
    a1.legend(fontsize=8)
    ratios = {
        "rollout /\nplain alias": res["rollout_over_plain_alias_throughput"],
        "hook-bound\n(in-process cost)": res["hook_bound_throughput_ratio"],
    }
    if "rollout_over_two_plain_aliases_throughput" in res:
        ratios["rollout /\ntwo plain aliases"] = res["rollout_over_two_plain_aliases_throughput"]
    a2.bar(list(ratios), list(ratios.values()), color=["tab:blue", "tab:gray", "tab:orange"][: len(ratios)])
    a2.axhline(0.95, color="tab:green", ls="--", label="goal >= 0.95")
    a2.set_ylim(0, max(1.1, 1.1 * max(ratios.values())))
    a2.tick_params(axis="x", labelsize=7)
    a2.set_title("throughput ratios (medians of phases)")
    a2.legend(fontsize=8)
    times = {
        "rollback\n(first bad answer\nto every replica)": res["rollback_seconds"],
        "promote\nunder load": res["promote_under_load_seconds"],
    }
    a3.bar(list(times), list(times.values()), color=["tab:red", "tab:blue"])
    a3.axhline(2.0, color="tab:green", ls="--", label="goal <= 2 s")
    a3.set_ylabel("seconds")
    a3.set_title("time to take effect under load")
    a3.legend(fontsize=8)
    fig.suptitle(
        f"rollout_bench, {report['machine']['cpus']} CPUs, load average at start "
        f"{report['machine']['load_avg_at_start'][0]:.1f} (shared machine: compare within this run)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    print(f"plot: {path.relative_to(ROOT)}")


def _corrupt_blob(reg, weights: Path) -> None:
    """Zero the tail of a published weights blob, as a broken disk would."""
    blob = Path(reg.blobs.path(hashlib.sha256(weights.read_bytes()).hexdigest()))
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-16:] = bytes(16)
    blob.write_bytes(bytes(data))


if __name__ == "__main__":
    main()
