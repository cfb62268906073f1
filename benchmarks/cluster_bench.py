"""Cluster benchmark: two vLLM replicas under Ray Serve, routed by adapter affinity vs without it.

16 tenants, each with its own adapter (rank 8 on q/v of the embedded base), send a Zipf(1.1) mix of
requests through the ingress from closed-loop clients. Each replica batches up to `--max-loras`
adapters and keeps `--hot-set` loaded (the plugin's hot set and Ray's multiplexing LRU are that size),
so every time a request meets a replica without its adapter, the plugin pulls, verifies and loads it:
the adapter-load count is the cost affinity is meant to cut. With the defaults the fleet's hot sets
together hold every adapter but one replica's does not: the case affinity exists for.
Runs, in one script on one machine:
  (a) 2 replicas, affinity routing (Ray Serve multiplexing keyed by the immutable reference);
  (b) 2 replicas, Ray's default routing (power of two choices, no affinity) — the "round robin" row;
  (c) 1 replica, the same mix — for the throughput of 2 replicas against 1;
and the time from `promote` to the new version answering on every replica (each asked directly).

    .venv/bin/python benchmarks/cluster_bench.py                     # >= 1,000 requests a mode
    .venv/bin/python benchmarks/cluster_bench.py --requests 200      # a quick look

Writes benchmarks/results/cluster.json (top-level `affinity_over_round_robin_loads`, target <= 0.3)
and cluster.png. On a 2-core machine the replicas share the same two cores, so 2-vs-1 throughput is
bounded near 1x there: the number is reported as measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapterhub_lite.base import EMBEDDED_BASE_DIR  # noqa: E402
from adapterhub_lite.cluster.launch import Cluster, ClusterOptions, quiet_ray_env  # noqa: E402
from adapterhub_lite.serving.supervisor import ServeOptions  # noqa: E402
from adapterhub_lite.serving.supervisor.launcher import free_port  # noqa: E402
from adapterhub_lite.tenants import TenantStore  # noqa: E402

PROMPT = [5, 120, 240, 360, 480, 600]
LABELS = {"affinity": "2, affinity", "round_robin": "2, Ray default", "one_replica": "1 replica"}
_LOADS = re.compile(r"^adapterhub_adapter_loads_total\{[^}]*\}\s+([0-9.e+]+)$", re.M)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1000, help="requests per mode")
    p.add_argument("--tenants", type=int, default=16, help="tenants, one adapter each")
    p.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of the tenant mix")
    p.add_argument("--max-loras", type=int, default=4, help="adapters in one batch, per replica")
    p.add_argument(
        "--hot-set",
        type=int,
        default=8,
        help="adapters a replica keeps loaded (serve's --max-cpu-loras default)",
    )
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=8, help="closed-loop concurrent clients")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-one-replica", action="store_true", help="leave out run (c)")
    p.add_argument(
        "--modes",
        default="affinity,round_robin,one_replica",
        help="which of the runs (a) affinity, (b) round_robin, (c) one_replica to make",
    )
    p.add_argument(
        "--split-cores",
        action="store_true",
        help="give each replica's vLLM cores of its own (cpus // replicas each; default: every "
        "replica's OpenMP threads bind to every core)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cluster.json"))
    return p.parse_args()


def make_world(root: Path, tenants: int) -> dict:
    """Adapters (v1 for each tenant, a v2 for tenant 0), published; tenants with alias `bot`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry

    hf_logging.disable_progress_bar()
    reg = open_registry(root / "registry")
    store = TenantStore.open(root / "tenants.db")
    refs, keys = {}, {}
    for i in range(tenants + 1):
        name, version = (f"t{i:02d}", "1.0.0") if i < tenants else ("t00", "2.0.0")
        torch.manual_seed(1000 + i)
        model = AutoModelForCausalLM.from_pretrained(EMBEDDED_BASE_DIR, dtype=torch.float32)
        peft_model = get_peft_model(
            model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        )
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        peft_model.save_pretrained(root / "adapters" / f"{name}-{version}")
        bundle = pack_bundle(
            root / "adapters" / f"{name}-{version}",
            root / "bundles" / f"{name}-{version}",
            namespace=name,
            name="bot",
            version=version,
            base_dir=EMBEDDED_BASE_DIR,
        )
        refs[(name, version)] = reg.publish(bundle).ref
    for i in range(tenants):
        name = f"t{i:02d}"
        _, keys[name] = store.add_tenant(name)
        store.set_alias(name, "bot", refs[(name, "1.0.0")])
    return {"refs": refs, "keys": keys, "store": store}


def zipf_mix(n: int, tenants: int, s: float, seed: int) -> list[str]:
    weights = 1.0 / np.arange(1, tenants + 1) ** s
    rng = np.random.default_rng(seed)
    return [f"t{i:02d}" for i in rng.choice(tenants, size=n, p=weights / weights.sum())]


def complete(client: httpx.Client, url: str, key: str) -> tuple[int, list[int] | None]:
    r = client.post(
        url + "/v1/completions",
        headers={"authorization": f"Bearer {key}"},
        json={
            "model": "bot",
            "prompt": PROMPT,
            "max_tokens": ARGS.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "return_tokens_as_token_ids": True,
            "logprobs": 0,
        },
        timeout=600,
    )
    if r.status_code != 200:
        return r.status_code, None
    return 200, [int(t.split(":")[1]) for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def loads(cluster: Cluster) -> float:
    total = 0.0
    for replica in cluster.replicas():
        text = httpx.get(
            replica["url"] + "/metrics", headers={"authorization": f"Bearer {cluster.admin_key}"}, timeout=60
        ).text
        total += sum(float(v) for v in _LOADS.findall(text))
    return total


def drive(cluster: Cluster, mix: list[str], keys: dict[str, str]) -> dict:
    """Send `mix` through the ingress from `--clients` closed-loop clients."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = list(enumerate(mix))
    lock = threading.Lock()

    def worker() -> None:
        with httpx.Client() as client:
            while True:
                with lock:
                    if not queue:
                        return
                    _, tenant = queue.pop()
                t0 = time.perf_counter()
                status, _ = complete(client, cluster.url, keys[tenant])
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    statuses[status] = statuses.get(status, 0) + 1

    loads_before = loads(cluster)
    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(ARGS.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = statuses.get(200, 0)
    return {
        "requests": len(mix),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "adapter_loads": loads(cluster) - loads_before,
        "latency_p50_s": statistics.median(latencies),
        "latency_p99_s": float(np.percentile(latencies, 99)),
        "wall_s": wall,
        "requests_per_s": ok / wall,
        "tokens_per_s": ok * ARGS.max_tokens / wall,
    }


def promote_visible(cluster: Cluster, world: dict) -> dict:
    """Promote t00's alias to v2; seconds until each replica, asked directly, answers with v2."""
    key = world["keys"]["t00"]
    with httpx.Client() as client:
        old = complete(client, cluster.url, key)[1]
        world["store"].set_alias("t00", "bot", world["refs"][("t00", "2.0.0")])
        t0 = time.perf_counter()
        seen = {}
        pending = {r["replica"]: r["url"] for r in cluster.replicas()}
        while pending and time.perf_counter() - t0 < 120:
            for rid, url in list(pending.items()):
                status, tokens = complete(client, url, key)
                if status == 200 and tokens != old:
                    seen[rid] = time.perf_counter() - t0
                    del pending[rid]
        world["store"].set_alias("t00", "bot", world["refs"][("t00", "1.0.0")])
    return {"per_replica_s": seen, "max_s": max(seen.values()) if seen else None, "missed": sorted(pending)}


def run_mode(world: dict, root: Path, mix: list[str], replicas: int, affinity: bool, promote: bool) -> dict:
    serve = ServeOptions(
        base_dir=str(EMBEDDED_BASE_DIR),
        registry=str(root / "registry"),
        tenants_db=str(root / "tenants.db"),
        cache_dir=str(root / f"cache-{replicas}-{affinity}"),
        max_loras=ARGS.max_loras,
        max_cpu_loras=ARGS.hot_set,
        max_loaded=ARGS.hot_set,
        max_lora_rank=8,
        max_model_len=256,
    )
    opts = ClusterOptions(
        serve=serve,
        replicas=replicas,
        affinity=affinity,
        port=free_port(),
        state_dir=str(root / f"state-{replicas}-{affinity}"),
        cores_per_replica=max(1, len(os.sched_getaffinity(0)) // replicas) if ARGS.split_cores else None,
    )
    label = f"{replicas} replica(s), {'affinity' if affinity else 'no affinity'}"
    print(f"[{label}] starting ...", flush=True)
    t0 = time.perf_counter()
    with Cluster(opts) as cluster:
        print(f"[{label}] ready in {time.perf_counter() - t0:.0f} s; {len(mix)} requests ...", flush=True)
        result = drive(cluster, mix, world["keys"])
        if promote:
            result["promote_visible"] = promote_visible(cluster, world)
    print(f"[{label}] {json.dumps(result)}", flush=True)
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    names = [LABELS.get(n, n) for n in runs]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    axes[0].bar(names, [r["adapter_loads"] for r in runs.values()], color="#4c72b0")
    axes[0].set_title("adapter loads (lower is better)")
    x = np.arange(len(names))
    axes[1].bar(x - 0.2, [r["latency_p50_s"] for r in runs.values()], 0.4, label="p50")
    axes[1].bar(x + 0.2, [r["latency_p99_s"] for r in runs.values()], 0.4, label="p99")
    axes[1].set_xticks(x, names)
    axes[1].set_title("latency per request (s)")
    axes[1].legend()
    axes[2].bar(names, [r["tokens_per_s"] for r in runs.values()], color="#55a868")
    axes[2].set_title("completion tokens/s")
    for ax in axes:
        ax.tick_params(axis="x", labelrotation=15)
    ratios = []
    if results["affinity_over_round_robin_loads"] is not None:
        ratios.append(f"affinity/round-robin loads = {results['affinity_over_round_robin_loads']:.2f}")
    if results["two_over_one_replica_throughput"] is not None:
        ratios.append(f"2/1 replicas throughput = {results['two_over_one_replica_throughput']:.2f}")
    cores = "cores split between replicas" if results["config"].get("split_cores") else "cores shared"
    fig.suptitle(
        f"{results['config']['tenants']} tenants, Zipf({results['config']['zipf']}), "
        f"hot set {results['config']['hot_set']} per replica, {results['machine']['cpus']} {cores}; "
        + "; ".join(ratios)
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    quiet_ray_env()
    root = Path(tempfile.mkdtemp(prefix="adapterhub-cluster-bench-"))
    print(f"building {ARGS.tenants} tenants' adapters in {root} ...", flush=True)
    world = make_world(root, ARGS.tenants)
    mix = zipf_mix(ARGS.requests, ARGS.tenants, ARGS.zipf, ARGS.seed)
    modes = ARGS.modes.split(",")
    if ARGS.skip_one_replica and "one_replica" in modes:
        modes.remove("one_replica")
    runs = {}
    if "affinity" in modes:
        runs["affinity"] = run_mode(world, root, mix, ARGS.replicas, True, promote=True)
    if "round_robin" in modes:
        runs["round_robin"] = run_mode(world, root, mix, ARGS.replicas, False, promote=False)
    if "one_replica" in modes:
        runs["one_replica"] = run_mode(world, root, mix, 1, True, promote=False)
    rr = runs.get("round_robin", {}).get("adapter_loads")
    both = "affinity" in runs and "one_replica" in runs
    results = {
        "affinity_over_round_robin_loads": (
            runs["affinity"]["adapter_loads"] / rr if rr and "affinity" in runs else None
        ),
        "two_over_one_replica_throughput": (
            runs["affinity"]["tokens_per_s"] / runs["one_replica"]["tokens_per_s"] if both else None
        ),
        "promote_visible_max_s": runs.get("affinity", {}).get("promote_visible", {}).get("max_s"),
        "config": {**vars(ARGS), "round_robin_means": "Ray Serve's default routing (power of two choices)"},
        "command": " ".join(["benchmarks/cluster_bench.py", *sys.argv[1:]]),
        "machine": {
            "note": (
                "one machine: every replica, the ingress and the clients share its cores, so 2-vs-1 "
                "throughput is bounded by the cores, not by the replicas; a shared machine, held alone "
                "for this run (other engineers' light work went on)"
            ),
            "cpus": os.cpu_count(),
            "load_avg_at_start": LOAD_AT_START,
            "platform": platform.platform(),
            "load_avg_at_end": os.getloadavg(),
        },
        "runs": runs,
    }
    out = Path(ARGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    out.write_text(json.dumps({**results, "provenance": provenance()}, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"affinity/round-robin adapter loads: {results['affinity_over_round_robin_loads']}")
    print(f"2 replicas / 1 replica throughput: {results['two_over_one_replica_throughput']}")
    print(f"wrote {out} and {out.with_suffix('.png')}")


ARGS = parse_args()
LOAD_AT_START = os.getloadavg()

if __name__ == "__main__":
    main()
