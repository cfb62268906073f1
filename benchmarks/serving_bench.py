"""Serving benchmark: multi-LoRA throughput against the base model, the plugin against plain vLLM, hot swap
against a restart, and the naive alternative, all in one run (ratios against baselines of the same run).

Closed-loop concurrent clients stream completions over HTTP and record throughput (completion tokens/s)
and time to first token (p50/p99) for
  (a) the base model alone, on the plain server (`results.base_plain`) and through the plugin;
  (b) the plugin path: tenants' aliases -> middleware -> resolver, N tenants' adapters in rotation
      (`results.plugin["N"]`, N from --tenants: the curve);
  (c) plain vLLM, the same adapters preloaded through --lora-modules, the same rotation, and the same
      LoRA ops as (b) (the plugin's entry point is enabled there only for them: no middleware, no
      resolver in the request path) at the counts in --plain-at;
  (d) the naive alternative: transformers + peft, `set_adapter` per request, one request at a time;
and hot-swap latency (promote -> first token from the new version) against a full server restart.

Every measured phase is the steady state of its adapter set: right before it, an unmeasured pass sends
one short request per adapter of that phase (on each server), so adapters the previous phases pushed out
of vLLM's caches are read back before the clock starts; that pass's time is reported as the phase's
`warm_s`, the cost of bringing the set in. The plain server is given every adapter and the same history:
counts not measured there still get their warm pass. With `ADAPTERHUB_LORA_TRACE=1` (set here) each
phase also reports what vLLM did to its LoRA slots while measured: `slot_writes` (adapters that entered
a slot), `disk_reads` and `disk_read_s` (adapters read from disk, and the time that took).

Targets (`report["targets"]`, checked in `report["verdict"]`): 16 adapters >= 0.8x the base model;
64 adapters in rotation >= 0.7x one adapter; (b)/(c) >= 0.95; (b)/(d) >= 10 at 16 tenants; restart /
hot swap >= 30. `--max-loras` and `--max-cpu-loras` default to what `adapterhub serve` picks. Run with
ADAPTERHUB_CPU_LORA_OPS=0 for vLLM's own CPU LoRA code on both servers.

    .venv/bin/python benchmarks/serving_bench.py                 # full size: ~15 min (+5 to build fixtures)
    .venv/bin/python benchmarks/serving_bench.py --quick         # a short version that proves it runs

Writes benchmarks/results/serving.json and serving.png.
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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving_load import (  # noqa: E402
    build_adapters,
    build_base,
    first_token_s,
    naive_phase,
    probe_cost_us,
    publish_all,
    run_phase,
)

from adapterhub_lite.kernels import cpu_lora_ops  # noqa: E402
from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer  # noqa: E402
from adapterhub_lite.tenants import TenantStore  # noqa: E402
from adapterhub_lite.vllm_compat.launch import PLUGIN_NAME  # noqa: E402
from adapterhub_lite.vllm_compat.lora_ops import TRACE_SWITCH  # noqa: E402

TARGETS = {
    "plugin_16_over_base": 0.8,
    "plugin_64_over_plugin_1": 0.7,
    "plugin_over_plain": 0.95,
    "plugin_16_over_naive_16": 10.0,
    "restart_over_hot_swap": 30.0,
}


def parse_args() -> argparse.Namespace:
    defaults = ServeOptions(base_dir="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tenants", default="1,4,16,64,256", help="adapter counts in rotation (the curve)")
    p.add_argument("--plain-at", default="1,16,64", help="counts also measured on plain vLLM ('' for none)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=128, help="requests per measured phase")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=defaults.max_loras, help="distinct adapters per batch")
    p.add_argument("--max-cpu-loras", type=int, default=defaults.max_cpu_loras, help="adapters kept loaded")
    p.add_argument("--repeats", type=int, default=3, help="alternating rounds; medians reported")
    p.add_argument("--naive-tenants", type=int, default=16)
    p.add_argument("--naive-requests", type=int, default=12, help="0 skips the naive baseline")
    p.add_argument("--swaps", type=int, default=5, help="hot swaps measured (0 skips swap and restart)")
    p.add_argument("--quick", action="store_true", help="a short version: proves the run, not the figures")
    p.add_argument("--tokenizer-from", default=None, help="model dir to copy the tokenizer from")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    if args.quick:
        args.tenants, args.plain_at = "1,4,16,64", "16"
        args.requests, args.repeats, args.naive_requests, args.swaps = 64, 1, 4, 2
    return args


# -- the run -------------------------------------------------------------------------------------------


def median_phase(runs: list[dict]) -> dict:
    out = dict(runs[0])
    keys = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "wall_s", "running_mean", "waiting_mean", "warm_s")
    for k in (*keys, *SLOT_USE, *(f"warm_{k}" for k in SLOT_USE)):
        if all(k in r for r in runs):
            out[k] = round(statistics.median(r[k] for r in runs), 1)
    out["runs"] = [r["tokens_per_s"] for r in runs]
    return out


SLOT_USE = ("slot_writes", "disk_reads", "disk_read_s")
_TRACE = re.compile(r"adapterhub trace: .*activations (\d+), read from disk (\d+) \(([\d.]+) s\)")


def slot_use(log: Path) -> dict:
    """The LoRA counts so far in a server's log (`ADAPTERHUB_LORA_TRACE` lines; the engine's last one),
    looking into the rotated `<log>.1` (removed before the servers start) when the log has none yet."""
    last = None
    for path in (log, log.with_name(log.name + ".1")):
        if path.is_file() and last is None:
            with path.open(errors="replace") as f:
                for line in f:
                    if "adapterhub trace:" in line:
                        last = _TRACE.search(line) or last
    writes, reads, read_s = (int(last[1]), int(last[2]), float(last[3])) if last else (0, 0, 0.0)
    return {"slot_writes": writes, "disk_reads": reads, "disk_read_s": read_s}


def paired_ratio(top: dict, bottom: dict) -> float:
    """The median over rounds of top/bottom measured in the same round (a round runs both back to back,
    so load that drifts between rounds cancels); phases with one run give the plain ratio."""
    pairs = [a / b for a, b in zip(top["runs"], bottom["runs"], strict=False) if b]
    return round(statistics.median(pairs), 3)


def ratios_and_verdict(results: dict, counts: list[int], plain_at: list[int]) -> tuple[dict, dict]:
    plugin = {n: results["plugin"][str(n)] for n in counts}
    ratios: dict = {}
    if 16 in plugin:
        ratios["plugin_16_over_base"] = paired_ratio(plugin[16], results["base_plain"])
    if 64 in plugin and 1 in plugin:
        ratios["plugin_64_over_plugin_1"] = paired_ratio(plugin[64], plugin[1])
    for n in plain_at:
        ratios[f"plugin_over_plain_{n}"] = paired_ratio(plugin[n], results["plain"][str(n)])
    ratios["plugin_over_plain_base"] = paired_ratio(results["base_plugin"], results["base_plain"])
    for n in counts:
        ratios[f"plugin_{n}_over_base"] = paired_ratio(plugin[n], results["base_plain"])
    if "naive" in results and 16 in plugin:
        ratios["plugin_16_over_naive_16"] = round(
            plugin[16]["tokens_per_s"] / results["naive"]["tokens_per_s"], 2
        )
        # The ceiling of that ratio: the base model alone, served by vLLM, over the naive loop. With a
        # model this small both are bound by per-step overhead on 2 cores, not by the adapters.
        ratios["base_plain_over_naive_16"] = round(
            results["base_plain"]["tokens_per_s"] / results["naive"]["tokens_per_s"], 2
        )
    if "hot_swap_s" in results:
        ratios["restart_over_hot_swap"] = round(results["restart_s"] / results["hot_swap_s"]["median"], 1)
    verdict = {}
    for name, target in TARGETS.items():
        got = [
            v for k, v in ratios.items() if k == name or (name == "plugin_over_plain" and k.startswith(name))
        ]
        if got:
            verdict[name] = {"target": f">= {target}", "worst": min(got), "met": min(got) >= target}
    return ratios, verdict


def main() -> None:
    args = parse_args()
    load_start = round(os.getloadavg()[0], 2)
    counts = [int(x) for x in args.tenants.split(",")]
    plain_at = [int(x) for x in args.plain_at.split(",") if x]
    if not set(plain_at) <= set(counts):
        raise SystemExit("--plain-at must be a subset of --tenants")
    n_adapters = max(max(counts), args.naive_tenants)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ahl-serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}")

    base, adapters, refs, swap_ref, store, keys = fixtures(args, work, n_adapters)

    max_cpu_loras = max(args.max_cpu_loras, args.max_loras)
    common = dict(
        base_dir=str(base),
        served_name="base",
        max_loras=args.max_loras,
        max_lora_rank=16,
        max_cpu_loras=max_cpu_loras,
        max_model_len=256,
    )
    plugin_opts = ServeOptions(
        **common,
        registry=str(work / "registry"),
        tenants_db=str(work / "tenants.db"),
        cache_dir=str(work / "cache"),
        max_loaded=max_cpu_loras,
        log_path=str(work / "plugin.log"),
    )
    plain_opts = ServeOptions(
        **common,
        plugin=False,
        lora_modules={f"a{i:03d}": str(d) for i, d in enumerate(adapters[: max(counts)])},
        log_path=str(work / "plain.log"),
    )

    for name in ("plugin.log.1", "plain.log.1"):  # a rotated log from an earlier run (see slot_use)
        (work / name).unlink(missing_ok=True)
    os.environ[TRACE_SWITCH] = "1"  # both servers log their slot writes and disk reads (slot_use)
    results: dict = {"plugin": {}, "plain": {}, "tenancy_probe_us": probe_cost_us(work / "tenants.db")}
    with VLLMServer(plugin_opts) as plugin:
        plain = VLLMServer(plain_opts)
        # Same LoRA ops as the plugin server: its entry point installs them (no middleware is configured,
        # and the resolver is only asked about unknown model names, which this phase never sends).
        plain.env["VLLM_PLUGINS"] = PLUGIN_NAME
        t_plain = time.perf_counter()
        plain.start()
        plain_start_s = time.perf_counter() - t_plain + first_token_s(plain.url, None, "a000")
        try:
            # Warm both: every adapter loaded once (the plugin path pulls and verifies here).
            warm = argparse.Namespace(**{**vars(args), "requests": n_adapters, "max_tokens": 2})
            run_phase(plugin.url, [(k, "bot") for k in keys[: max(counts)]], warm, seed=1)
            if plain_at:
                run_phase(plain.url, [(None, f"a{i:03d}") for i in range(max(counts))], warm, seed=1)

            admin = {plugin.url: plugin.admin_key}  # /metrics behind the middleware
            logs = {"plugin": work / "plugin.log", "plain": work / "plain.log"}
            # one short request per adapter of the phase, unmeasured: its set is loaded when the clock starts
            warm_pass = argparse.Namespace(**{**vars(args), "max_tokens": 2})
            base_runs = {"plugin": [], "plain": []}
            per = {name: {n: [] for n in counts} for name in ("plugin", "plain")}
            for rep in range(args.repeats):
                # One round: the base on both servers, then every count on each. Odd rounds run it all
                # backwards, so load that drifts during a round does not favour the phases run first.
                order: list[tuple[str, object, str, list]] = [
                    ("plain", "base", plain.url, [(None, "base")]),
                    ("plugin", "base", plugin.url, [(keys[0], "base")]),
                ]
                for n in counts:
                    order.append(("plugin", n, plugin.url, [(k, "bot") for k in keys[:n]]))
                    if plain_at:  # the same history: a count not measured there still gets its warm pass
                        order.append(("plain", n, plain.url, [(None, f"a{i:03d}") for i in range(n)]))
                if rep % 2:
                    order.reverse()
                for name, n, url, jobs in order:
                    seed = 10 + rep if n == "base" else 100 * int(n) + rep
                    log, cold = logs[name], {}
                    mark = slot_use(log)
                    if n != "base":
                        t_warm = time.perf_counter()
                        warm_pass.requests = len(jobs)
                        run_phase(url, jobs, warm_pass, seed=seed + 50, metrics_key=admin.get(url))
                        cold = {"warm_s": round(time.perf_counter() - t_warm, 2)}
                        before, mark = mark, slot_use(log)  # the warm pass's end: the measured phase's start
                        cold.update({f"warm_{k}": round(v - before[k], 3) for k, v in mark.items()})
                        if name == "plain" and n not in plain_at:
                            continue
                    r = run_phase(url, jobs, args, seed=seed, metrics_key=admin.get(url))
                    r.update({k: round(v - mark[k], 3) for k, v in slot_use(log).items()})
                    r.update(cold)
                    (base_runs[name] if n == "base" else per[name][n]).append(r)
                    what = "base model" if n == "base" else f"{n:>3} adapters"
                    print(
                        f"round {rep} {name:>6} {what}: {r['tokens_per_s']:8.1f} tok/s  "
                        f"TTFT p50 {r['ttft_p50_ms']:.0f} ms  p99 {r['ttft_p99_ms']:.0f} ms  "
                        f"warm pass {r.get('warm_s')} s ({r.get('warm_disk_reads')} disk reads); "
                        f"measured: {r['slot_writes']} slot writes, {r['disk_reads']} disk reads "
                        f"({r['disk_read_s']} s)",
                        flush=True,
                    )
            results["base_plain"] = median_phase(base_runs["plain"])
            results["base_plugin"] = median_phase(base_runs["plugin"])
            for name in ("plugin", "plain"):
                for n in counts:
                    if per[name][n]:
                        results[name][str(n)] = median_phase(per[name][n])
            if args.swaps:
                results["hot_swap_s"] = hot_swaps(
                    work, store, plugin, keys[0], [swap_ref, refs[0]], args.swaps
                )
        finally:
            t_stop = time.perf_counter()
            plain.stop()
            plain_stop_s = time.perf_counter() - t_stop
    if args.swaps:
        results["restart_s"] = round(plain_stop_s + plain_start_s, 2)
        results["restart_parts_s"] = {
            "stop": round(plain_stop_s, 2),
            "start_to_first_token": round(plain_start_s, 2),
        }
    if args.naive_requests:
        results["naive"] = naive_phase(base, adapters[: args.naive_tenants], args)

    ratios, verdict = ratios_and_verdict(results, counts, plain_at)
    report = {
        "benchmark": "serving",
        "command": " ".join(["benchmarks/serving_bench.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # other work on the machine skews absolute figures; ratios are measured interleaved
            "load_average_start_end": [load_start, round(os.getloadavg()[0], 2)],
            "shared": os.environ.get("ADAPTERHUB_BENCH_QUIET") != "1",
        },
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
            "max_cpu_loras": max_cpu_loras,
            # Both servers run adapterhub's grouped CPU LoRA code unless this is "0".
            cpu_lora_ops.ENV_SWITCH: os.environ.get(cpu_lora_ops.ENV_SWITCH, "1"),
        },
        "targets": {k: f">= {v}" for k, v in TARGETS.items()},
        "verdict": verdict,
        "results": results,
        "ratios": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    out.write_text(json.dumps({**report, "provenance": provenance()}, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps({"ratios": ratios, "verdict": verdict}, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def fixtures(args: argparse.Namespace, work: Path, n_adapters: int):
    """Base, adapters, registry and tenants in `work`; reused when a previous run left enough there."""
    state = work / "fixtures.json"
    if state.is_file() and len(json.loads(state.read_text())["refs"]) >= n_adapters:
        fx = json.loads(state.read_text())
        store = TenantStore.open(work / "tenants.db")
        return work / "base", [Path(p) for p in fx["adapters"]], fx["refs"], fx["swap_ref"], store, fx["keys"]
    base = build_base(args, work / "base")
    adapters = build_adapters(base, work / "adapters", n_adapters, args.rank)
    refs = publish_all(base, adapters, work)
    swap_ref = refs.pop()
    store = TenantStore.open(work / "tenants.db")
    keys = []
    for i, ref in enumerate(refs):
        _, key = store.add_tenant(f"t{i:03d}", base_access=True)
        store.set_alias(f"t{i:03d}", "bot", ref)
        keys.append(key)
    fx = {"adapters": [str(p) for p in adapters], "refs": refs, "swap_ref": swap_ref, "keys": keys}
    state.write_text(json.dumps(fx))
    return base, adapters, refs, swap_ref, store, keys


def hot_swaps(
    work: Path, store: TenantStore, plugin: VLLMServer, key: str, targets: list[str], n: int
) -> dict:
    """Promote tenant 0's alias to a version never loaded, then to and fro; promote -> first token."""
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.tenants.view import promote

    reg = open_registry(work / "registry")
    swaps = []
    for i in range(n):
        target = targets[i % 2]
        t0 = time.perf_counter()
        promote(store, reg, "t000", "bot", target)
        swaps.append(time.perf_counter() - t0 + first_token_s(plugin.url, key, "bot", target))
    return {
        "median": round(statistics.median(swaps), 4),
        "all": [round(s, 4) for s in swaps],
        "first_cold": round(swaps[0], 4),
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    counts = [int(c) for c in res["plugin"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    for name, style, label in (("plugin", "o-", "plugin (b)"), ("plain", "s", "plain vLLM, same ops (c)")):
        xs = [c for c in counts if str(c) in res[name]]
        mid = [res[name][str(c)]["tokens_per_s"] for c in xs]
        lo = [m - min(res[name][str(c)]["runs"]) for m, c in zip(mid, xs, strict=True)]
        hi = [max(res[name][str(c)]["runs"]) - m for m, c in zip(mid, xs, strict=True)]
        ax.errorbar(xs, mid, yerr=[lo, hi], fmt=style, capsize=3, label=label)
    base = res["base_plain"]["tokens_per_s"]
    ax.axhline(base, color="gray", ls="--", label="base model alone (a)")
    ax.axhline(0.8 * base, color="gray", ls=":", label="0.8x base (target at 16)")
    if "naive" in res:
        ax.axhline(res["naive"]["tokens_per_s"], color="red", ls=":", label="naive peft (d)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"adapters in rotation (--max-loras {report['config']['max_loras']})")
    ax.set_ylabel("completion tokens / s")
    ax.set_title("Throughput, closed loop (median; bars: min-max of rounds)", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    for name, style in (("plugin", "o-"), ("plain", "s--")):
        xs = [c for c in counts if str(c) in res[name]]
        ax.plot(xs, [res[name][str(c)]["ttft_p50_ms"] for c in xs], style, label=f"{name} p50")
        ax.plot(xs, [res[name][str(c)]["ttft_p99_ms"] for c in xs], style, alpha=0.5, label=f"{name} p99")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapters in rotation")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("Time to first token")
    ax.legend(fontsize=8)
    ax = axes[2]
    if "hot_swap_s" in res:
        vals = [res["hot_swap_s"]["median"], res["restart_s"]]
        ax.bar(
            ["hot swap\n(promote -> 1st token)", "restart\n(stop, start, 1st token)"],
            vals,
            color=["C2", "C3"],
        )
        ax.set_yscale("log")
        ax.set_ylabel("seconds (log)")
        ax.set_title(f"Version change: {report['ratios']['restart_over_hot_swap']}x faster")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g} s", ha="center", va="bottom")
    shared = " - SHARED MACHINE, figures noisy" if report["machine"]["shared"] else ""
    fig.suptitle(
        f"adapterhub serving on {report['machine']['cpus']} CPUs "
        f"(hidden {report['config']['hidden']}, {report['config']['layers']} layers){shared}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
