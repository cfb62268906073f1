"""The CPU adapter-slot defaults from measurement: --max-loras / --max-cpu-loras against throughput with
1, 16 and 64 adapters in rotation, and what each slot costs in host memory.

For each setting, one plugin server (hot set = --max-cpu-loras) serves serving_bench's closed-loop
clients; the resident memory of its processes (API server, engine core, model worker) is read from /proc
right after start (vLLM's stacked LoRA weights for --max-loras slots are allocated then) and after the
64-adapter phase (the CPU cache full). The defaults in `serving/config.py` come from this file's output.

    .venv/bin/python benchmarks/serving_sweep.py                     # ~4 min a setting, quiet machine
    .venv/bin/python benchmarks/serving_sweep.py --settings 4/8,32/64 --requests 32

Writes benchmarks/results/serving_max_loras_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving_bench import fixtures  # noqa: E402
from serving_load import run_phase  # noqa: E402

from adapterhub_lite.kernels import cpu_lora_ops  # noqa: E402
from adapterhub_lite.serving.supervisor import (  # noqa: E402
    ServeOptions,
    VLLMServer,
    processes,  # noqa: E402
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--settings", default="4/8,16/32,32/64", help="max_loras/max_cpu_loras pairs")
    p.add_argument("--counts", default="1,16,64", help="adapters in rotation per phase")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--tokenizer-from", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving_max_loras_sweep.json"))
    p.add_argument("--workdir", default=None)
    return p.parse_args()


def rss_mib(server: VLLMServer) -> dict[str, float]:
    """Resident memory (MiB) of each of the server's processes, by name, and their sum."""
    out: dict[str, float] = {}
    assert server.process is not None
    for pid in processes.group_pids(server.process.pid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        name = fields.get("Name", "?").strip()
        kib = int(fields.get("VmRSS", "0 kB").split()[0])
        key = name if name not in out else f"{name}.{pid}"
        out[key] = round(kib / 1024, 1)
    out["total"] = round(sum(out.values()), 1)
    return out


def main() -> None:
    args = parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    settings = [tuple(int(v) for v in s.split("/")) for s in args.settings.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ahl-serving-sweep-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}")
    base, _adapters, _refs, _swap, _store, keys = fixtures(args, work, max(counts) + 1)
    load_start = round(os.getloadavg()[0], 2)
    points = []
    for max_loras, max_cpu_loras in settings:
        opts = ServeOptions(
            base_dir=str(base),
            served_name="base",
            max_loras=max_loras,
            max_lora_rank=16,
            max_cpu_loras=max_cpu_loras,
            max_model_len=256,
            registry=str(work / "registry"),
            tenants_db=str(work / "tenants.db"),
            cache_dir=str(work / "cache"),
            max_loaded=max_cpu_loras,
            log_path=str(work / f"plugin-{max_loras}-{max_cpu_loras}.log"),
        )
        point: dict = {"max_loras": max_loras, "max_cpu_loras": max_cpu_loras, "tokens_per_s": {}}
        with VLLMServer(opts) as server:
            point["rss_mib_started"] = rss_mib(server)
            warm = argparse.Namespace(**{**vars(args), "requests": max(counts), "max_tokens": 2})
            run_phase(server.url, [(k, "bot") for k in keys[: max(counts)]], warm, seed=1)
            for n in counts:
                jobs = [(k, "bot") for k in keys[:n]]
                r = run_phase(server.url, jobs, args, seed=100 * n, metrics_key=server.admin_key)
                point["tokens_per_s"][str(n)] = r["tokens_per_s"]
                point.setdefault("running_mean", {})[str(n)] = r.get("running_mean")
                point.setdefault("waiting_mean", {})[str(n)] = r.get("waiting_mean")
                point.setdefault("ttft_p50_ms", {})[str(n)] = r["ttft_p50_ms"]
                print(f"{max_loras}/{max_cpu_loras} {n:>3} adapters: {r['tokens_per_s']:7.1f} tok/s")
            point["rss_mib_after"] = rss_mib(server)
        tps = point["tokens_per_s"]
        if "1" in tps:
            point["ratios_to_1"] = {n: round(v / tps["1"], 3) for n, v in tps.items() if n != "1"}
        points.append(point)
    # memory a slot costs: the difference between settings over the difference in slots
    lo, hi = points[0], points[-1]
    per_slot = {}
    if len(points) > 1 and hi["max_loras"] != lo["max_loras"]:
        d_gpu_slots = hi["max_loras"] - lo["max_loras"]
        d_cpu_slots = hi["max_cpu_loras"] - lo["max_cpu_loras"]
        per_slot = {
            "started_mib_per_max_loras_slot": round(
                (hi["rss_mib_started"]["total"] - lo["rss_mib_started"]["total"]) / d_gpu_slots, 2
            ),
            "after_mib_per_max_cpu_loras_slot": round(
                (hi["rss_mib_after"]["total"] - lo["rss_mib_after"]["total"]) / d_cpu_slots, 2
            ),
            "note": "differences of whole-process RSS between the first and last setting; noisy at the "
            "MiB level (allocator pages), a bound rather than an exact cost",
        }
    report = {
        "benchmark": "serving max-loras sweep",
        "command": " ".join(["benchmarks/serving_sweep.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_start_end": [load_start, round(os.getloadavg()[0], 2)],
            "shared": os.environ.get("ADAPTERHUB_BENCH_QUIET") != "1",
        },
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
            cpu_lora_ops.ENV_SWITCH: os.environ.get(cpu_lora_ops.ENV_SWITCH, "1"),
        },
        "points": points,
        "memory_per_slot": per_slot,
    }
    out = Path(args.out)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    out.write_text(json.dumps({**report, "provenance": provenance()}, indent=2) + "\n")
    print(json.dumps({p_["max_loras"]: p_["tokens_per_s"] for p_ in points}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
