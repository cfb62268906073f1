"""Serving benchmark: the plugin path against plain vLLM, the naive alternative, and a restart.

Closed-loop concurrent clients stream completions over HTTP and record throughput (completion tokens/s)
and time to first token (p50/p99) for
  (a) the base model alone;
  (b) the plugin path: tenants' aliases -> middleware -> resolver, with N tenants' adapters in rotation;
  (c) plain vLLM with the same adapters preloaded through --lora-modules (no plugin), same rotation;
  (d) the naive alternative: transformers + peft, `set_adapter` per request, one request at a time;
and hot-swap latency (promote -> first token from the new version) against a full server restart
(stop, start with the new adapter, first token).

Targets (issue 4): (b)/(c) >= 0.95 at equal adapter counts; (b)/(d) >= 10 at 16 tenants; restart /
hot swap >= 30. The model is a random-init Llama big enough that compute, not HTTP, dominates.

On vLLM's CPU build the plugin also installs grouped multi-LoRA ops (adapterhub_lite/serving/
cpu_lora_ops.py), so (b)/(c) measures both; run with ADAPTERHUB_CPU_LORA_OPS=0 to measure the
plugin's own overhead alone (both servers then run vLLM's reference ops).

    .venv/bin/python benchmarks/serving_bench.py                 # full size
    .venv/bin/python benchmarks/serving_bench.py --quick         # ~10 minutes on 2 CPU cores

Writes benchmarks/results/serving.json and serving.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapterhub_lite.serving import ServeOptions, TenantStore, VLLMServer, cpu_lora_ops  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB_IDS = 1000  # prompt token ids are drawn below this: inside any tokenizer the base may have
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--tenants", default="1,8,16,64", help="adapter counts in rotation, comma-separated")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=64, help="requests per measured phase")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=8, help="distinct adapters per batch (both servers)")
    p.add_argument("--repeats", type=int, default=1, help="alternating plugin/plain rounds; medians reported")
    p.add_argument("--naive-tenants", type=int, default=16)
    p.add_argument("--naive-requests", type=int, default=16)
    p.add_argument("--swaps", type=int, default=5, help="hot swaps measured")
    p.add_argument("--quick", action="store_true", help="smaller sizes that fit ~10 min on 2 cores")
    p.add_argument("--tokenizer-from", default=None, help="model dir to copy the tokenizer from")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    if args.quick:
        args.tenants = "1,8,16"
        args.requests = 64
        args.naive_requests = 12
        args.swaps = 3
        args.repeats = 3
    return args


# -- fixtures: a random-init base, random adapters, a registry, tenants --------------------------------


def build_base(args: argparse.Namespace, out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterhub_lite.base import resolve_base_dir

    src = resolve_base_dir(args.tokenizer_from)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


def build_adapters(base: Path, out: Path, count: int, rank: int) -> list[Path]:
    """`count` PEFT adapters: one made with peft, the rest the same tensors re-drawn at random."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    first = out / "a000"
    peft_model.save_pretrained(first)
    template = load_file(first / "adapter_model.safetensors")
    dirs = []
    for i in range(count):
        d = out / f"a{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        if d != first:
            shutil.copy(first / "adapter_config.json", d / "adapter_config.json")
        gen = torch.Generator().manual_seed(1000 + i)
        tensors = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in template.items()}
        save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
        dirs.append(d)
    return dirs


def publish_all(base: Path, adapters: list[Path], work: Path) -> list[str]:
    from tqdm import tqdm

    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import Registry

    reg = Registry.open(work / "registry")
    refs = []
    for i, d in enumerate(tqdm(adapters, desc="pack+publish", unit="adapter")):
        bundle = pack_bundle(
            d, work / "bundles" / d.name, namespace=f"t{i:03d}", name="bot", version="1.0.0", base_dir=base
        )
        refs.append(reg.publish(bundle).ref)
    # hot-swap targets: a second version for tenant 0
    bundle = pack_bundle(
        adapters[-1], work / "bundles" / "swap", namespace="t000", name="bot", version="2.0.0", base_dir=base
    )
    refs.append(reg.publish(bundle).ref)
    return refs


# -- load generation -----------------------------------------------------------------------------------


def run_phase(url: str, jobs: list[tuple[str | None, str]], args: argparse.Namespace, seed: int) -> dict:
    """Send `args.requests` streamed completions, `concurrency` at a time; jobs rotate (key, model)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB_IDS) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    lock = threading.Lock()
    next_i = [0]
    ttfts: list[float] = []
    tokens = [0]
    errors: list[str] = []

    def worker() -> None:
        try:
            _worker()
        except Exception as exc:  # a dead client thread must fail the phase, not shrink it
            errors.append(repr(exc))

    def _worker() -> None:
        with httpx.Client(timeout=300) as client:
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                if i >= args.requests:
                    return
                key, model = jobs[i % len(jobs)]
                body = {
                    "model": model,
                    "prompt": prompts[i],
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "ignore_eos": True,
                    "stream_options": {"include_usage": True},
                }
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                t0 = time.perf_counter()
                first = None
                with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as resp:
                    if resp.status_code != 200:
                        errors.append(f"{resp.status_code} {resp.read()[:200]!r}")
                        continue
                    for line in resp.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(f"error event in stream: {chunk['error']}")
                        # a chunk carries one token; its text may be empty (an incomplete UTF-8 byte sequence)
                        if first is None and chunk.get("choices"):
                            first = time.perf_counter() - t0
                        if chunk.get("usage"):
                            with lock:
                                tokens[0] += chunk["usage"]["completion_tokens"]
                if first is not None:
                    with lock:
                        ttfts.append(first)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    ttfts.sort()
    return {
        "requests": args.requests,
        "completion_tokens": tokens[0],
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens[0] / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
    }


def first_token_s(url: str, key: str | None, model: str, expect_model: str | None = None) -> float:
    """Seconds from now to the first streamed token (optionally: from the named model version)."""
    body = {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 2, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if expect_model and chunk["model"] != expect_model:
                    raise RuntimeError(f"served {chunk['model']}, expected {expect_model}")
                return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def probe_cost_us(db: Path, n: int = 20000) -> dict:
    """What a request pays to notice an alias move made by another process: one `PRAGMA data_version`."""
    reader = TenantStore.open(db)
    t0 = time.perf_counter()
    for _ in range(n):
        reader.data_version()
    probe = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(200):
        reader.all_aliases()
    reload = (time.perf_counter() - t0) / 200
    reader.close()
    return {"data_version_probe": round(probe * 1e6, 2), "reload_all_aliases": round(reload * 1e6, 1)}


def _best_threads(model, prompt_len: int) -> int:
    """Give the naive path its best torch thread count: on a busy machine OpenMP threads that spin
    waiting for each other can make 2 threads many times slower than 1."""
    import torch

    ids = torch.randint(3, VOCAB_IDS, (1, prompt_len))
    timings = {}
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        with torch.no_grad():
            model(input_ids=ids)
            t0 = time.perf_counter()
            for _ in range(3):
                model(input_ids=ids)
        timings[n] = time.perf_counter() - t0
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best


def naive_phase(base: Path, adapters: list[Path], args: argparse.Namespace) -> dict:
    """transformers + peft: all adapters in one PeftModel, `set_adapter` then `generate` per request."""
    import torch
    from peft import PeftModel
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    names = [f"n{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, d in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(d, adapter_name=name)
    threads = _best_threads(peft_model, args.prompt_len)
    rng = random.Random(7)
    tokens, ttfts = 0, []
    t0 = time.perf_counter()
    for i in tqdm(range(args.naive_requests), desc="naive", unit="req"):
        peft_model.set_adapter(names[i % len(names)])
        ids = torch.tensor([[rng.randrange(3, VOCAB_IDS) for _ in range(args.prompt_len)]])
        s = time.perf_counter()
        with torch.no_grad():
            peft_model.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttfts.append(time.perf_counter() - s)
        with torch.no_grad():
            out = peft_model.generate(
                input_ids=ids, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False
            )
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t0 - sum(ttfts)  # the TTFT probes are not part of the throughput
    ttfts.sort()
    return {
        "requests": args.naive_requests,
        "adapters": len(adapters),
        "torch_threads": threads,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p99_ms": round(1000 * ttfts[-1], 1),
    }


# -- the run -------------------------------------------------------------------------------------------


def median_phase(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for k in ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "wall_s"):
        out[k] = round(statistics.median(r[k] for r in runs), 1)
    out["runs"] = [r["tokens_per_s"] for r in runs]
    return out


def main() -> None:
    args = parse_args()
    load_start = round(os.getloadavg()[0], 2)
    counts = [int(x) for x in args.tenants.split(",")]
    n_adapters = max(max(counts), args.naive_tenants)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ahl-serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}")

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

    common = dict(
        base_dir=str(base),
        served_name="base",
        max_loras=args.max_loras,
        max_lora_rank=16,
        max_cpu_loras=max(n_adapters + 1, args.max_loras),
        max_model_len=256,
    )
    plugin_opts = ServeOptions(
        **common,
        registry=str(work / "registry"),
        tenants_db=str(work / "tenants.db"),
        cache_dir=str(work / "cache"),
        max_loaded=n_adapters + 1,
        log_path=str(work / "plugin.log"),
    )
    plain_opts = ServeOptions(
        **common,
        plugin=False,
        lora_modules={f"a{i:03d}": str(d) for i, d in enumerate(adapters)},
        log_path=str(work / "plain.log"),
    )

    results: dict = {"plugin": {}, "plain": {}, "tenancy_probe_us": probe_cost_us(work / "tenants.db")}
    with VLLMServer(plugin_opts) as plugin:
        t_plain = time.perf_counter()
        plain = VLLMServer(plain_opts).start()
        plain_start_s = time.perf_counter() - t_plain + first_token_s(plain.url, None, "a000")
        try:
            # Warm both: every adapter loaded once (the plugin path pulls and verifies here).
            warm = argparse.Namespace(**{**vars(args), "requests": n_adapters, "max_tokens": 2})
            run_phase(plugin.url, [(k, "bot") for k in keys], warm, seed=1)
            run_phase(plain.url, [(None, f"a{i:03d}") for i in range(n_adapters)], warm, seed=1)

            base_runs = {"plugin": [], "plain": []}
            per = {name: {n: [] for n in counts} for name in ("plugin", "plain")}
            for rep in range(args.repeats):
                base_runs["plain"].append(run_phase(plain.url, [(None, "base")], args, seed=10 + rep))
                base_runs["plugin"].append(run_phase(plugin.url, [(keys[0], "base")], args, seed=10 + rep))
                for n in counts:
                    order = [
                        ("plugin", plugin.url, [(k, "bot") for k in keys[:n]]),
                        ("plain", plain.url, [(None, f"a{i:03d}") for i in range(n)]),
                    ]
                    if rep % 2:
                        order.reverse()  # alternate who goes first, so drift does not favour one side
                    for name, url, jobs in order:
                        r = run_phase(url, jobs, args, seed=100 * n + rep)
                        per[name][n].append(r)
                        print(
                            f"{name:>6} {n:>3} adapters: {r['tokens_per_s']:8.1f} tok/s  "
                            f"TTFT p50 {r['ttft_p50_ms']:.0f} ms  p99 {r['ttft_p99_ms']:.0f} ms"
                        )
            results["base_plain"] = median_phase(base_runs["plain"])
            results["base_plugin"] = median_phase(base_runs["plugin"])
            for name in ("plugin", "plain"):
                for n in counts:
                    results[name][str(n)] = median_phase(per[name][n])

            # Hot swap: promote tenant 0's alias to a version never loaded, then to and fro.
            from adapterhub_lite.registry import Registry
            from adapterhub_lite.serving.view import promote

            reg = Registry.open(work / "registry")
            swaps = []
            targets = [swap_ref, refs[0]]
            for i in range(args.swaps):
                target = targets[i % 2]
                t0 = time.perf_counter()
                promote(store, reg, "t000", "bot", target)
                swaps.append(time.perf_counter() - t0 + first_token_s(plugin.url, keys[0], "bot", target))
            results["hot_swap_s"] = {
                "median": round(statistics.median(swaps), 4),
                "all": [round(s, 4) for s in swaps],
                "first_cold": round(swaps[0], 4),
            }
        finally:
            t_stop = time.perf_counter()
            plain.stop()
            plain_stop_s = time.perf_counter() - t_stop
    results["restart_s"] = round(plain_stop_s + plain_start_s, 2)
    results["restart_parts_s"] = {
        "stop": round(plain_stop_s, 2),
        "start_to_first_token": round(plain_start_s, 2),
    }

    results["naive"] = naive_phase(base, adapters[: args.naive_tenants], args)

    ratios = {
        f"plugin_over_plain_{n}": round(
            results["plugin"][str(n)]["tokens_per_s"] / results["plain"][str(n)]["tokens_per_s"], 3
        )
        for n in counts
    }
    ratios["plugin_over_plain_base"] = round(
        results["base_plugin"]["tokens_per_s"] / results["base_plain"]["tokens_per_s"], 3
    )
    near = min(counts, key=lambda n: abs(n - args.naive_tenants))
    ratios[f"plugin_{near}_over_naive_{args.naive_tenants}"] = round(
        results["plugin"][str(near)]["tokens_per_s"] / results["naive"]["tokens_per_s"], 2
    )
    ratios["restart_over_hot_swap"] = round(results["restart_s"] / results["hot_swap_s"]["median"], 1)
    report = {
        "benchmark": "serving",
        "command": " ".join(sys.argv),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            # other work on the machine skews absolute figures; ratios are measured interleaved
            "load_average_start_end": [load_start, round(os.getloadavg()[0], 2)],
        },
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
            # The plugin path runs adapterhub's grouped CPU LoRA ops unless this is "0"; plain vLLM never.
            cpu_lora_ops.ENV_SWITCH: os.environ.get(cpu_lora_ops.ENV_SWITCH, "1"),
        },
        "targets": {
            "plugin_over_plain": ">= 0.95",
            "plugin_over_naive_16": ">= 10",
            "restart_over_hot_swap": ">= 30",
        },
        "results": results,
        "ratios": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(json.dumps(ratios, indent=2))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    counts = list(res["plugin"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    x = range(len(counts))
    w = 0.38
    for name, dx, label in (("plugin", -w / 2, "plugin (b)"), ("plain", w / 2, "plain vLLM (c)")):
        mid = [res[name][c]["tokens_per_s"] for c in counts]
        runs = [res[name][c]["runs"] for c in counts]
        err = [
            [m - min(r) for m, r in zip(mid, runs, strict=True)],
            [max(r) - m for m, r in zip(mid, runs, strict=True)],
        ]
        ax.bar([i + dx for i in x], mid, w, yerr=err, capsize=3, label=label)
    ax.axhline(res["base_plain"]["tokens_per_s"], color="gray", ls="--", label="base alone (a)")
    ax.axhline(
        res["naive"]["tokens_per_s"],
        color="red",
        ls=":",
        label=f"naive peft (d), {res['naive']['adapters']} adapters",
    )
    ax.set_xticks(list(x), [f"{c} adapters" for c in counts])
    ax.set_ylabel("completion tokens / s")
    ax.set_title("Throughput, closed loop (median; whiskers: min-max of rounds)", fontsize=9)
    ax.legend(fontsize=8)
    ax = axes[1]
    for name, style in (("plugin", "o-"), ("plain", "s--")):
        ax.plot(counts, [res[name][c]["ttft_p50_ms"] for c in counts], style, label=f"{name} p50")
        ax.plot(counts, [res[name][c]["ttft_p99_ms"] for c in counts], style, alpha=0.5, label=f"{name} p99")
    ax.set_xlabel("adapters in rotation")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title("Time to first token")
    ax.legend(fontsize=8)
    ax = axes[2]
    vals = [res["hot_swap_s"]["median"], res["restart_s"]]
    ax.bar(
        ["hot swap\n(promote -> 1st token)", "restart\n(stop, start, 1st token)"], vals, color=["C2", "C3"]
    )
    ax.set_yscale("log")
    ax.set_ylabel("seconds (log)")
    ax.set_title(f"Version change: {report['ratios']['restart_over_hot_swap']}x faster")
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.3g} s", ha="center", va="bottom")
    fig.suptitle(
        f"adapterhub serving on {report['machine']['cpus']} CPUs "
        f"(hidden {report['config']['hidden']}, {report['config']['layers']} layers)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
