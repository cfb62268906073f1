"""Soak benchmark: many adapters churned through a small hot set for minutes, resources sampled throughout.

Tenants each own a dozen small PEFT adapters (plain peft, random weights, on the embedded base),
published to a registry; client threads ask for them at random through
`adapterhub serve`-equivalent settings (a hot set smaller than the adapters, a disk cache smaller than
all bundles), and every answer is checked against offline peft (greedy tokens). Every few seconds it
samples, per vLLM process, RSS and open file descriptors; the disk cache's bytes, $TMPDIR's bytes (the
server gets a fresh one); vLLM's loaded adapters; `/metrics` series. It reports, against the bounds:

    rss_slope_mib_per_1k_requests   per process, least squares after the first 20 % of the run
    rss_slope_split_...             the same for anonymous and for file-backed resident pages
    rss_after_idle_vs_warm          per process, RSS after an idle pause / RSS after warm-up
    hot_set_max                     most adapters loaded at one sample (bound: --max-loaded)
    disk_cache_max_bytes            bound: --cache-max-mb
    metrics_series_max              /metrics series; lora_info_series_max for vllm:lora_requests_info
    tmpdir_max_bytes, fds_max

    .venv/bin/python benchmarks/soak_bench.py                  # ~10 minutes of load + setup
    .venv/bin/python benchmarks/soak_bench.py --minutes 20     # the committed long run
    ADAPTERHUB_HEAP_TRIM=0 .venv/bin/python benchmarks/soak_bench.py \
        --out benchmarks/results/soak_no_heap_trim.json              # the worker without heap trims
    (--workdir DIR keeps the adapters, registry and tenants for the next run with the same DIR)

Writes benchmarks/results/soak.json and soak.png (or --out). The machine may be shared with other
work: the output records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapterhub_lite.serving.config import ServingConfig  # noqa: E402
from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer  # noqa: E402
from adapterhub_lite.serving.supervisor.processes import group_pids  # noqa: E402
from adapterhub_lite.tenants import TenantStore  # noqa: E402
from adapterhub_lite.vllm_compat.memory import rss_parts  # noqa: E402

PROMPT = [5, 120, 240, 360, 480, 600]
N_TOKENS = 4
TARGETS = ["q_proj", "v_proj"]


def complete(http: httpx.Client, key: str, model: str) -> httpx.Response:
    """One churn request: greedy, `N_TOKENS` long, token ids back (each answer is checked against
    offline peft)."""
    return http.post(
        "/v1/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "model": model,
            "prompt": PROMPT,
            "max_tokens": N_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the churn (load) phase")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--adapters-per-tenant", type=int, default=12)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-loras", type=int, default=2)
    p.add_argument("--max-cpu-loras", type=int, default=4)
    p.add_argument("--max-loaded", type=int, default=4)
    p.add_argument("--idle-seconds", type=int, default=30)
    p.add_argument("--cache-max-mb", type=int, default=6)
    p.add_argument("--sample-seconds", type=float, default=3.0)
    p.add_argument("--idle-pause", type=float, default=60.0, help="seconds without load at the end")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    p.add_argument("--workdir", default=None)
    return p.parse_args()


# -- fixtures ---------------------------------------------------------------------------------------


def make_adapters(base: Path, out: Path, names: list[str]) -> tuple[dict[str, Path], dict[str, list[int]]]:
    """One PEFT adapter per name (seeded random A/B, scaled so outputs differ) and its greedy tokens
    offline with plain peft."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    dirs, expected = {}, {}
    for i, name in enumerate(names):
        peft_model = get_peft_model(base_model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        gen = torch.Generator().manual_seed(1000 + i)
        for pname, param in peft_model.named_parameters():
            if "lora_A" in pname or "lora_B" in pname:
                param.data = torch.randn(param.shape, generator=gen) * 0.3
        dirs[name] = out / name
        peft_model.save_pretrained(dirs[name])
        base_model = peft_model.unload()  # the base again, without LoRA layers
        model = PeftModel.from_pretrained(base_model, dirs[name]).eval()
        ids = torch.tensor([PROMPT])
        with torch.no_grad():
            for _ in range(N_TOKENS):
                ids = torch.cat([ids, model(input_ids=ids).logits[0, -1].argmax().view(1, 1)], dim=1)
        expected[name] = ids[0, len(PROMPT) :].tolist()
        base_model = model.unload()
    return dirs, expected


def publish(base: Path, work: Path, args: argparse.Namespace):
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry

    tenants = [f"t{i}" for i in range(args.tenants)]
    names = [f"{t}-a{j}" for t in tenants for j in range(args.adapters_per_tenant)]
    dirs, expected = make_adapters(base, work / "adapters", names)
    reg = open_registry(work / "registry")
    store = TenantStore.open(work / "tenants.db")
    keys, aliases, by_ref = {}, {}, {}
    for t in tenants:
        _, keys[t] = store.add_tenant(t)
        aliases[t] = []
    for name in names:
        tenant, alias = name.split("-")
        bundle = pack_bundle(
            dirs[name],
            work / "bundles" / name,
            namespace=tenant,
            name=alias,
            version="1.0.0",
            base_dir=base,
            vllm_check=False,  # the server asks vLLM itself before loading
        )
        ref = reg.publish(bundle).ref
        store.set_alias(tenant, alias, ref)
        aliases[tenant].append(alias)
        by_ref[ref] = expected[name]
    bundle_bytes = sum(f.stat().st_size for f in (work / "bundles").rglob("*") if f.is_file())
    return keys, aliases, by_ref, len(names), bundle_bytes


def setup(base: Path, work: Path, args: argparse.Namespace):
    """Adapters, registry and tenants in `work`, made once: a later run with the same --workdir reuses
    them (the server's cache and temp folder start empty each run)."""
    saved = work / "setup.json"
    if saved.is_file():
        s = json.loads(saved.read_text())
        return s["keys"], s["aliases"], s["by_ref"], s["adapters"], s["bundle_bytes"]
    keys, aliases, by_ref, n, size = publish(base, work, args)
    saved.write_text(
        json.dumps({"keys": keys, "aliases": aliases, "by_ref": by_ref, "adapters": n, "bundle_bytes": size})
    )
    return keys, aliases, by_ref, n, size


# -- sampling ---------------------------------------------------------------------------------------


def _dir_bytes(path: Path) -> tuple[int, int]:
    total = files = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            try:
                total += os.lstat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                continue
    return total, files


def _role(pid: int, leader: int) -> str:
    if pid == leader:
        return "api_server"
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return f"pid{pid}"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    if "EngineCore" in comm or "EngineCore" in cmd:
        return "engine_core"
    return comm or f"pid{pid}"


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def sample(server: VLLMServer, cache: Path, tmpdir: Path, admin: dict, requests_done: int) -> dict:
    leader = server.process.pid
    rss, anon, files, fds = {}, {}, {}, 0
    for pid in group_pids(leader):
        value = _rss_mib(pid)
        if value is not None:
            role = _role(pid, leader)
            rss[role] = rss.get(role, 0.0) + value
            parts = rss_parts(pid)  # anonymous (heap, Python) vs file-backed (mapped code and files)
            anon[role] = anon.get(role, 0.0) + parts.get("RssAnon", 0) / 2**20
            files[role] = files.get(role, 0.0) + parts.get("RssFile", 0) / 2**20
            fds += _fds(pid)
    cache_bytes, _ = _dir_bytes(cache)
    tmp_bytes, tmp_files = _dir_bytes(tmpdir)
    status = httpx.get(server.url + "/adapterhub/v1/status", headers=admin, timeout=30).json()
    metrics = httpx.get(server.url + "/metrics", headers=admin, timeout=30).text
    series = [line for line in metrics.splitlines() if line and not line.startswith("#")]
    return {
        "t": time.monotonic(),
        "requests": requests_done,
        "rss_mib": rss,
        "rss_anon_mib": anon,
        "rss_file_mib": files,
        "fds": fds,
        "cache_bytes": cache_bytes,
        "tmpdir_bytes": tmp_bytes,
        "tmpdir_files": tmp_files,
        "loaded": len(status["loaded"]),
        "metrics_series": len(series),
        "metrics_bytes": len(metrics),
        "lora_info_series": sum(1 for line in series if line.startswith("vllm:lora_requests_info{")),
    }


def slope_per_1k(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y per 1,000 x."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return 1000 * sum((x - mx) * (y - my) for x, y in points) / sxx


# -- the run ----------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    from adapterhub_lite.base import EMBEDDED_BASE_DIR

    work = Path(args.workdir or tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t_setup = time.monotonic()
    keys, aliases, by_ref, n_adapters, bundle_bytes = setup(EMBEDDED_BASE_DIR, work, args)
    setup_s = time.monotonic() - t_setup
    print(f"{n_adapters} adapters published ({bundle_bytes / 1e6:.1f} MB of bundles) in {setup_s:.0f} s")

    server_tmp, cache = work / "server-tmp", work / "cache"
    for folder in (server_tmp, cache):
        shutil.rmtree(folder, ignore_errors=True)
    server_tmp.mkdir()
    opts = ServeOptions(
        base_dir=str(EMBEDDED_BASE_DIR),
        registry=str(work / "registry"),
        tenants_db=str(work / "tenants.db"),
        cache_dir=str(cache),
        max_loras=args.max_loras,
        max_cpu_loras=args.max_cpu_loras,
        max_loaded=args.max_loaded,
        idle_seconds=args.idle_seconds,
        cache_max_mb=args.cache_max_mb,
        max_model_len=256,
        log_path=str(work / "vllm.log"),
    )
    server = VLLMServer(opts)
    server.env["TMPDIR"] = str(server_tmp)  # what the server writes to temp space, measured alone
    counts = {"ok": 0, "wrong": 0, "errors": 0}
    errors: dict[str, int] = {}
    wrong: list[dict] = []
    error_examples: list[dict] = []  # the first few, to tell a race from a bug without the log
    lock = threading.Lock()
    stop = threading.Event()
    samples: list[dict] = []
    with server:
        print(f"server ready: {server.phases}")
        admin = {"Authorization": f"Bearer {server.admin_key}"}

        def client(i: int) -> None:
            rng = random.Random(i)
            with httpx.Client(base_url=server.url, timeout=300) as http:
                while not stop.is_set():
                    tenant = rng.choice(list(keys))
                    alias = rng.choice(aliases[tenant])
                    try:
                        r = complete(http, keys[tenant], alias)
                    except httpx.HTTPError as exc:
                        with lock:
                            counts["errors"] += 1
                            errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                            if len(error_examples) < 10:
                                error_examples.append({"alias": alias, "error": repr(exc)[:300]})
                        continue
                    with lock:
                        if r.status_code != 200:
                            counts["errors"] += 1
                            errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                            if len(error_examples) < 10:
                                error_examples.append(
                                    {"alias": alias, "status": r.status_code, "body": r.text[:300]}
                                )
                            continue
                        body = r.json()
                        got = body["choices"][0]["token_ids"]
                        if by_ref.get(body["model"]) == got and body["model"].startswith(tenant + "/"):
                            counts["ok"] += 1
                        else:
                            counts["wrong"] += 1
                            if len(wrong) < 5:
                                wrong.append({"tenant": tenant, "alias": alias, "model": body["model"]})

        def done() -> int:
            with lock:
                return counts["ok"] + counts["wrong"] + counts["errors"]

        samples.append({**sample(server, cache, server_tmp, admin, 0), "phase": "ready"})
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        end = t0 + args.minutes * 60
        while time.monotonic() < end:
            time.sleep(args.sample_seconds)
            samples.append({**sample(server, cache, server_tmp, admin, done()), "phase": "load"})
            s = samples[-1]
            print(
                f"{s['t'] - t0:6.0f} s  {s['requests']:6d} req  loaded {s['loaded']}  "
                f"cache {s['cache_bytes'] / 1e6:.2f} MB  series {s['metrics_series']}  "
                + "  ".join(f"{k} {v:.0f} MiB" for k, v in sorted(s["rss_mib"].items())),
                flush=True,
            )
        stop.set()
        for t in threads:
            t.join(timeout=300)
        load_s = time.monotonic() - t0
        idle_end = time.monotonic() + args.idle_pause
        while time.monotonic() < idle_end:
            time.sleep(args.sample_seconds)
            samples.append({**sample(server, cache, server_tmp, admin, done()), "phase": "idle"})
    shm_left = list(server.shm_left)
    load_after = os.getloadavg()

    result = summarize(args, samples, counts, errors, wrong, load_s, n_adapters, bundle_bytes)
    result.update(
        {
            "error_examples": error_examples,
            "heap_trim": ServingConfig.from_env().heap_trim,
            "shm_left_by_vllm_at_stop": shm_left,
            "startup_phases_s": server.phases,
            "setup_s": round(setup_s, 1),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in load_after],
                "note": "shared machine: other work ran at the same time; slopes are per request",
            },
            "samples": samples,
        }
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    out.write_text(json.dumps({**result, "provenance": provenance()}, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    summary = {k: v for k, v in result.items() if k not in ("samples", "machine")}
    print(json.dumps(summary, indent=2))
    print(f"results: {out} and {out.with_suffix('.png')}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def summarize(args, samples, counts, errors, wrong, load_s, n_adapters, bundle_bytes) -> dict:
    load = [s for s in samples if s["phase"] == "load"]
    warm = load[len(load) // 5 :] if len(load) >= 5 else load
    roles = sorted({r for s in samples for r in s["rss_mib"]})

    def slopes_of(key: str) -> dict[str, float | None]:
        return {
            r: slope_per_1k([(s["requests"], s[key][r]) for s in warm if r in s.get(key, {})]) for r in roles
        }

    slopes = slopes_of("rss_mib")
    after_warm = {r: warm[0]["rss_mib"].get(r) for r in roles} if warm else {}
    idle = [s for s in samples if s["phase"] == "idle"]
    after_idle = {r: idle[-1]["rss_mib"].get(r) for r in roles} if idle else {}
    total = counts["ok"] + counts["wrong"] + counts["errors"]
    return {
        "minutes": round(load_s / 60, 2),
        "requests": total,
        "requests_per_s": round(total / load_s, 2) if load_s else None,
        "answers_equal_offline_peft": counts["ok"],
        "answers_wrong": counts["wrong"],
        "wrong_examples": wrong,
        "errors": counts["errors"],
        "errors_by_kind": errors,
        "adapters": n_adapters,
        "bundle_bytes_all": bundle_bytes,
        "bounds": {
            "max_loaded": args.max_loaded,
            "cache_max_bytes": args.cache_max_mb * 1024 * 1024,
            "max_loras": args.max_loras,
            "max_cpu_loras": args.max_cpu_loras,
            "idle_seconds": args.idle_seconds,
        },
        "rss_slope_mib_per_1k_requests": {r: None if v is None else round(v, 3) for r, v in slopes.items()},
        "rss_slope_split_mib_per_1k_requests": {
            part: {r: None if v is None else round(v, 3) for r, v in slopes_of(f"rss_{part}_mib").items()}
            for part in ("anon", "file")
        },
        "rss_after_warmup_mib": {r: None if v is None else round(v, 1) for r, v in after_warm.items()},
        "rss_after_idle_mib": {r: None if v is None else round(v, 1) for r, v in after_idle.items()},
        "rss_after_idle_vs_warm": {
            r: round(after_idle[r] / after_warm[r], 4)
            for r in roles
            if after_idle.get(r) and after_warm.get(r)
        },
        "hot_set_max": max(s["loaded"] for s in samples),
        "disk_cache_max_bytes": max(s["cache_bytes"] for s in samples),
        "metrics_series_max": max(s["metrics_series"] for s in samples),
        "metrics_series_first": samples[0]["metrics_series"],
        "lora_info_series_max": max(s["lora_info_series"] for s in samples),
        "tmpdir_max_bytes": max(s["tmpdir_bytes"] for s in samples),
        "tmpdir_max_files": max(s["tmpdir_files"] for s in samples),
        "fds_max": max(s["fds"] for s in samples),
        "fds_first": samples[0]["fds"],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t0 = samples[0]["t"]
    ts = [(s["t"] - t0) / 60 for s in samples]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    for role in sorted({r for s in samples for r in s["rss_mib"]}):
        first = next(s["rss_mib"][role] for s in samples if role in s["rss_mib"])
        ax.plot(
            [s["requests"] for s in samples],
            [s["rss_mib"][role] - first if role in s["rss_mib"] else None for s in samples],
            label=f"{role} (from {first:.0f} MiB)",
        )
    ax.set_xlabel("requests")
    ax.set_ylabel("RSS change since ready (MiB)")
    ax.set_title(f"RSS per vLLM process (heap trim {'on' if result['heap_trim'] else 'off'})")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.plot(ts, [s["loaded"] for s in samples], label="adapters loaded")
    ax.axhline(result["bounds"]["max_loaded"], color="red", linestyle="--", label="--max-loaded")
    ax.set_xlabel("minutes")
    ax.set_title("hot set")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    ax.plot(ts, [s["cache_bytes"] / 1e6 for s in samples], label="disk cache")
    ax.plot(ts, [s["tmpdir_bytes"] / 1e6 for s in samples], label="server $TMPDIR")
    ax.axhline(result["bounds"]["cache_max_bytes"] / 1e6, color="red", linestyle="--", label="--cache-max-mb")
    ax.set_xlabel("minutes")
    ax.set_ylabel("MB")
    ax.set_title("disk")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    ax.plot(ts, [s["metrics_series"] for s in samples], label="/metrics series")
    ax.plot(ts, [s["lora_info_series"] for s in samples], label="vllm:lora_requests_info series")
    ax.set_xlabel("minutes")
    ax.set_title("metrics cardinality")
    ax.legend(fontsize=8)
    fig.suptitle(
        f"soak: {result['requests']} requests over {result['minutes']} min, "
        f"{result['adapters']} adapters (shared machine)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
