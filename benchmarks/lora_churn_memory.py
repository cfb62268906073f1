"""LoRA load/unload churn against a real server, sampling the vLLM worker's memory: faster than a soak.

One client asks for the soak's adapters in turn (t0-a0, t1-a0, ..., t3-a11, t0-a0, ...) through a hot set
smaller than them, so that every request loads one adapter into vLLM and (past warm-up) unloads
another: each request is one `add_lora` and one `remove_lora` in the worker. Every `--sample-every`
requests it samples each vLLM process's RSS; with `--probe` the worker also records, after every LoRA
change, its RSS and glibc's `mallinfo2` (vllm_compat/memory.py), and every `--probe-every` changes
the Python objects (and, with `--tracemalloc N`, the allocation sites) that grew. Reports the RSS
slope per 1,000 loads after warm-up, per process, and the same for the glibc figures.

Levers, one at a time (same adapters with --workdir):

    .venv/bin/python benchmarks/lora_churn_memory.py --workdir $TMPDIR/churn --out $TMPDIR/churn-default.json
    ... --env ADAPTERHUB_HEAP_TRIM=0                         the worker without the heap trim
    ... --env GLIBC_TUNABLES=glibc.malloc.arena_max=2        fewer glibc arenas
    ... --probe --tracemalloc 12                             what the worker's Python allocates

Answers are checked against offline peft as in the soak. The machine may be shared: slopes are per load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from soak_bench import _role, _rss_mib, complete, setup, slope_per_1k  # noqa: E402

from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer  # noqa: E402
from adapterhub_lite.serving.supervisor.processes import group_pids  # noqa: E402
from adapterhub_lite.vllm_compat.memory import rss_parts  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=1500)
    p.add_argument("--warmup", type=int, default=300, help="requests left out of the slopes")
    p.add_argument("--sample-every", type=int, default=25)
    p.add_argument("--max-loaded", type=int, default=4)
    p.add_argument("--max-loras", type=int, default=2)
    p.add_argument("--max-cpu-loras", type=int, default=4)
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for vLLM's processes")
    p.add_argument("--probe", action="store_true", help="record memory inside the worker per LoRA change")
    p.add_argument("--probe-every", type=int, default=500)
    p.add_argument("--tracemalloc", type=int, default=0, help="frames; 0: off")
    p.add_argument("--idle-pause", type=float, default=20.0)
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None)
    # the soak's adapters (setup() reads these)
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--adapters-per-tenant", type=int, default=12)
    return p.parse_args()


def rss_by_role(leader: int) -> dict[str, float]:
    """RSS per process role, and its anonymous / file-backed parts (`role:anon`, `role:file`), MiB."""
    out: dict[str, float] = {}
    for pid in group_pids(leader):
        value = _rss_mib(pid)
        if value is not None:
            role = _role(pid, leader)
            parts = rss_parts(pid)
            for key, mib in (
                (role, value),
                (f"{role}:anon", parts.get("RssAnon", 0) / 2**20),
                (f"{role}:file", parts.get("RssFile", 0) / 2**20),
            ):
                out[key] = out.get(key, 0.0) + mib
    return out


def probe_slopes(lines: list[dict], warmup_loads: int) -> dict:
    """Per 1,000 loads after warm-up: RSS and each mallinfo2 figure, in MiB."""
    adds = [ln for ln in lines if ln["op"] == "add"]
    if len(adds) < warmup_loads + 3:
        return {}
    tail = [(i, ln) for i, ln in enumerate(adds) if i >= warmup_loads]
    out = {"rss": slope_per_1k([(i, ln["rss"] / 2**20) for i, ln in tail])}
    for key in ("RssAnon", "RssFile", "maps", "Threads"):
        if key in tail[0][1]:
            scale = 2**20 if key.startswith("Rss") else 1
            out[key] = slope_per_1k([(i, ln[key] / scale) for i, ln in tail])
    if tail[0][1].get("mallinfo2"):
        for key in ("arena", "hblkhd", "uordblks", "fordblks", "keepcost"):
            out[key] = slope_per_1k([(i, ln["mallinfo2"][key] / 2**20) for i, ln in tail])
    if "traced" in tail[0][1]:
        out["traced"] = slope_per_1k([(i, ln["traced"] / 2**20) for i, ln in tail])
    return {k: None if v is None else round(v, 3) for k, v in out.items()}


def main() -> None:
    args = parse_args()
    from adapterhub_lite.base import EMBEDDED_BASE_DIR

    work = Path(args.workdir or tempfile.mkdtemp(prefix="churn-"))
    work.mkdir(parents=True, exist_ok=True)
    keys, aliases, by_ref, n_adapters, _ = setup(EMBEDDED_BASE_DIR, work, args)
    order = [(t, a) for a in range(args.adapters_per_tenant) for t in sorted(keys)]
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    probe_path = work / "probe.jsonl"
    probe_path.unlink(missing_ok=True)
    opts = ServeOptions(
        base_dir=str(EMBEDDED_BASE_DIR),
        registry=str(work / "registry"),
        tenants_db=str(work / "tenants.db"),
        cache_dir=str(cache),
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_loaded=args.max_loaded,
        idle_seconds=3600,
        cache_max_mb=64,
        max_model_len=256,
        log_path=str(work / "churn-vllm.log"),  # the soak, sharing a --workdir, keeps its own log
    )
    server = VLLMServer(opts)
    extra = dict(kv.split("=", 1) for kv in args.env)
    if args.probe:
        extra.update(
            {
                "ADAPTERHUB_MEMORY_PROBE": str(probe_path),
                "ADAPTERHUB_MEMORY_PROBE_EVERY": str(args.probe_every),
                "ADAPTERHUB_MEMORY_PROBE_TRACEMALLOC": str(args.tracemalloc),
            }
        )
    server.env.update(extra)
    samples, wrong, errors = [], 0, 0
    t0 = time.monotonic()
    with server:
        leader = server.process.pid
        samples.append({"requests": 0, "rss_mib": rss_by_role(leader)})
        with httpx.Client(base_url=server.url, timeout=300) as http:
            for i in range(args.requests):
                tenant, j = order[i % len(order)]
                alias = aliases[tenant][j]
                r = complete(http, keys[tenant], alias)
                if r.status_code != 200:
                    errors += 1
                else:
                    body = r.json()
                    wrong += by_ref.get(body["model"]) != body["choices"][0]["token_ids"]
                if (i + 1) % args.sample_every == 0:
                    samples.append({"requests": i + 1, "rss_mib": rss_by_role(leader)})
                    if (i + 1) % (args.sample_every * 8) == 0:
                        w = samples[-1]["rss_mib"].get("VLLM::Worker", 0.0)
                        took = time.monotonic() - t0
                        print(f"{i + 1:5d} req  {took:5.0f} s  worker {w:.1f} MiB", flush=True)
        load_s = time.monotonic() - t0
        time.sleep(args.idle_pause)
        idle = rss_by_role(leader)
    roles = sorted({r for s in samples for r in s["rss_mib"]})
    warm = [s for s in samples if s["requests"] >= args.warmup]
    lines = [json.loads(x) for x in probe_path.read_text().splitlines()] if probe_path.is_file() else []
    result = {
        "requests": args.requests,
        "load_s": round(load_s, 1),
        "env": extra,
        "answers_wrong": wrong,
        "errors": errors,
        "rss_slope_mib_per_1k_requests": {
            r: round(
                slope_per_1k([(s["requests"], s["rss_mib"][r]) for s in warm if r in s["rss_mib"]]) or 0.0, 3
            )
            for r in roles
        },
        "rss_after_warmup_mib": {r: round(warm[0]["rss_mib"].get(r, 0), 1) for r in roles},
        "rss_end_mib": {r: round(samples[-1]["rss_mib"].get(r, 0), 1) for r in roles},
        "rss_after_idle_mib": {r: round(v, 1) for r, v in idle.items()},
        "probe_changes": len(lines),
        "probe_slopes_mib_per_1k_loads": probe_slopes(lines, args.warmup),
        "probe_details": [ln for ln in lines if "objects" in ln],
        "probe_last": lines[-1] if lines else None,
        "samples": samples,
        "loadavg": os.getloadavg(),
    }
    out = Path(args.out or work / "churn.json")
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    out.write_text(json.dumps({**result, "provenance": provenance()}, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "probe_details")}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()
