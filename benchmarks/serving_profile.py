"""Where a server step goes: the base model alone against 16 adapters in rotation, sampled inside vLLM's
engine process (and the API server process) with py-spy while serving_bench's closed-loop clients run.

Each sampled stack is put in one bucket by its innermost frame that names one (rules in `BUCKETS`):
the LoRA arithmetic, the LoRA layer and punica wrapper glue around it, the punica metadata updates, the
base model's own compute, sampling, input preparation, scheduling, the engine loop and its IPC, and idle
waiting. Shares of samples are meaningful on a shared machine; absolute times are not.

    .venv/bin/pip install py-spy
    .venv/bin/python benchmarks/serving_profile.py                 # plugin path, grouped ops (default)
    ADAPTERHUB_CPU_LORA_OPS=0 .venv/bin/python benchmarks/serving_profile.py \
        --out benchmarks/results/serving_profile_reference.json      # vLLM's own CPU LoRA code

Writes benchmarks/results/serving_profile.json and a markdown table next to it (.md).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serving_load as sb  # noqa: E402

from adapterhub_lite.kernels import cpu_lora_ops  # noqa: E402
from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer  # noqa: E402
from adapterhub_lite.tenants import TenantStore  # noqa: E402

# A sample whose innermost frames wait (a lock, a queue, a socket, the shared-memory step broadcast) is idle.
IDLE_KEYS = (
    "threading.py",
    "futures/thread.py",
    "queue.py",
    "selectors.py",
    "connection.py",
    "shm_broadcast.py",
    "_monitor.py",
    "poll.py",
    "socket.py",
    "sched_yield",
    "select (",
    "parent_watch.py",  # adapterhub's thread that waits for its launcher to exit
    "run_forever",
    "_run_once",
)
# (bucket, substrings of "function (file:line)"): the innermost frame matching any rule names the bucket.
ENGINE_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("lora: arithmetic (bgmv/sgmv ops, grouped products)", ("lora/ops/", "cpu_lora_ops.py")),
    (
        "lora: punica metadata (mapping, indices)",
        (
            "update_metadata",
            "convert_mapping",
            "compute_meta",
            "set_active_loras",
            "set_adapter_mapping",
            "set_active_adapters",
            "make_lora_inputs",
            "_apply_adapters",
            "group_rows",
        ),
    ),
    ("base model: linear layers (GEMM)", ("onednn_mm", "unquantized_gemm", "layers/linear.py")),
    ("lora: layer wrappers and punica glue", ("vllm/lora/", "vllm_compat/lora_ops.py")),
    ("base model: attention", ("attn", "attention")),
    ("base model: norms, activations, rotary, embeddings", ("model_executor/",)),
    ("sampling and logits", ("v1/sample/", "logits")),
    ("input preparation (model runner)", ("v1/worker/",)),
    ("scheduling", ("v1/core/",)),
    ("engine loop, outputs and IPC", ("v1/engine/", "v1/executor/", "msgspec", "zmq", "serial_utils")),
]
API_BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("adapterhub middleware", ("adapterhub_lite/",)),
    (
        "vLLM OpenAI serving (validate, tokenize, stream, detokenize)",
        ("entrypoints/", "v1/engine/", "tokeniz", "detokeniz", "pydantic", "protocol.py"),
    ),
    ("event loop in C (uvloop: waiting, or I/O)", ("Runner.run (",)),
    ("http, asyncio and the rest", ("uvicorn", "starlette", "fastapi", "asyncio", "h11", "httptools")),
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=128, help="requests per profiled phase")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=ServeOptions(base_dir="").max_loras)
    p.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    p.add_argument("--tokenizer-from", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving_profile.json"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--resummarize", action="store_true", help="recount --out from the raw files in --workdir")
    return p.parse_args()


def resummarize(args: argparse.Namespace) -> None:
    out = Path(args.out)
    report = json.loads(out.read_text())
    for tag, phase in report["phases"].items():
        for proc in [k for k in phase if k != "tokens_per_s"]:
            raw = Path(args.workdir) / f"{tag.replace(' ', '_')}-{proc}.txt"
            phase[proc] = summarize(raw, API_BUCKETS if proc == "api_server" else ENGINE_BUCKETS)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    out.write_text(json.dumps({**report, "provenance": provenance()}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(out.with_suffix(".md").read_text())


def processes(server: VLLMServer) -> dict[str, int]:
    """The API server's pid, its engine core child's and the engine's model worker's."""
    import psutil

    api = psutil.Process(server.process.pid)
    pids = {"api_server": api.pid}
    for child in api.children(recursive=True):
        title = child.name() + " " + " ".join(child.cmdline())
        if "EngineCore" in title:
            pids["engine_core"] = child.pid
        elif "Worker" in title:
            pids["worker"] = child.pid
    if "engine_core" not in pids:
        raise RuntimeError(f"no engine core process under {api.pid}")
    return pids


def record(
    pids: dict[str, int], rate: int, folder: Path, tag: str
) -> list[tuple[str, subprocess.Popen, Path]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    procs = []
    for name, pid in pids.items():
        out = folder / f"{tag}-{name}.txt"
        cmd = [
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--idle",
            "--threads",
        ]
        cmd += ["--output", str(out)]
        procs.append((name, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE), out))
    time.sleep(1.0)  # py-spy attaches
    return procs


def stop(procs: list[tuple[str, subprocess.Popen, Path]]) -> dict[str, Path]:
    for _, proc, _ in procs:
        proc.send_signal(signal.SIGINT)
    done = {}
    for name, proc, out in procs:
        _, err = proc.communicate(timeout=60)
        if not out.is_file():
            raise RuntimeError(f"py-spy wrote nothing for {name}: {err.decode()[-500:]}")
        done[name] = out
    return done


def bucket_of(frames: list[str], rules: list[tuple[str, tuple[str, ...]]]) -> str:
    if frames and any(k in frames[-1] for k in IDLE_KEYS):
        return "idle (waiting for work)"
    for frame in reversed(frames):  # innermost first
        for name, keys in rules:
            if any(k in frame for k in keys):
                return name
    return "other"


def summarize(path: Path, rules: list[tuple[str, tuple[str, ...]]]) -> dict:
    """Samples per bucket from py-spy's raw (collapsed) output, for the busiest thread."""
    per_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        per_thread[thread][bucket_of(frames, rules)] += int(count)
    counts: collections.Counter = collections.Counter()
    if per_thread:
        # the thread doing the work (model, scheduler, event loop); the others mostly wait
        thread = max(
            per_thread, key=lambda t: sum(v for k, v in per_thread[t].items() if not k.startswith("idle"))
        )
        counts = per_thread[thread]
    total = sum(counts.values()) or 1
    return {
        "samples": sum(counts.values()),
        "share": {k: round(v / total, 4) for k, v in counts.most_common()},
    }


def _table(report: dict, proc: str, buckets: list[str]) -> list[str]:
    phases = [p for p in report["phases"] if proc in report["phases"][p]]
    lines = ["| bucket | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
    for b in buckets:
        vals = [report["phases"][p][proc]["share"].get(b, 0.0) for p in phases]
        if any(vals):
            lines.append(f"| {b} | " + " | ".join(f"{100 * v:.1f}%" for v in vals) + " |")
    return lines


def weight_bytes(cfg: dict) -> dict:
    """Bytes of weights a decode step must read (float32): the base's linear layers once, and each
    distinct adapter's LoRA matrices once (rank x (in + out) per target module). A decode row is one
    token, so with a row or two per adapter nothing amortises an adapter's read: this is the floor the
    LoRA arithmetic cannot go under on a CPU whose decode step streams weights from memory."""
    h, i, layers, r = cfg["hidden"], cfg["intermediate"], cfg["layers"], cfg["rank"]
    shapes = [(h, h)] * 4 + [(h, i)] * 2 + [(i, h)]  # q, k, v, o, gate, up, down (kv heads = heads)
    base = layers * sum(a * b for a, b in shapes) * 4
    adapter = layers * sum(r * (a + b) for a, b in shapes) * 4
    return {"base_linear_mb": round(base / 1e6, 1), "one_adapter_mb": round(adapter / 1e6, 2)}


def floor_lines(report: dict) -> list[str]:
    wb = weight_bytes(report["config"])
    cfg = report["config"]
    # distinct adapters in one batch: at most one per request in flight, and at most --max-loras
    n = min(cfg["adapters"], cfg["max_loras"], cfg["concurrency"])
    per = wb["one_adapter_mb"] / wb["base_linear_mb"]
    return [
        "",
        "The floor (`weight_bytes`): a decode step reads the base's linear weights once "
        f"({wb['base_linear_mb']} MB) and every distinct adapter's LoRA weights once "
        f"({wb['one_adapter_mb']} MB each, {100 * per:.1f}% of the base); the FLOPs are {100 * per:.1f}% per "
        f"token too, but a decode batch has a token or two per adapter, so the reads do not amortise. With "
        f"{n} distinct adapters in a batch that is {100 * n * per:.0f}% more bytes than the base's linear "
        f"layers; at the bandwidth the base's GEMMs get, the LoRA arithmetic takes at least {n * per:.2f}x "
        f"the base's linear-layer time, whatever the number of ops.",
    ]


def markdown(report: dict) -> str:
    phases = list(report["phases"])
    engine = [b for b, _ in ENGINE_BUCKETS] + ["idle (waiting for work)", "other"]
    lines = [
        f"Share of py-spy samples ({report['config']['rate']} Hz, wall clock, busiest thread per process; "
        f"{'shared' if report['machine']['shared'] else 'machine held alone by the bench wrapper'}, "
        f"load average {report['machine']['load_average_start_end']}). "
        f"`{cpu_lora_ops.ENV_SWITCH}={report['config'][cpu_lora_ops.ENV_SWITCH]} {report['command']}`.",
        "",
        "Throughput (tok/s): " + ", ".join(f"{p} {report['phases'][p]['tokens_per_s']}" for p in phases),
        "",
        "Model worker (runs the forward pass; idle = waiting for the engine core's next step):",
        "",
        *_table(report, "worker", engine),
        "",
        "Engine core (scheduling, IPC):",
        "",
        *_table(report, "engine_core", engine),
        "",
        "API server (event loop thread):",
        "",
        *_table(report, "api_server", [b for b, _ in API_BUCKETS] + ["idle (waiting for work)", "other"]),
        *floor_lines(report),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    if args.resummarize:
        return resummarize(args)
    load_start = round(os.getloadavg()[0], 2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ahl-serving-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if not (base / "config.json").is_file():
        sb.build_base(args, base)
    adapters = sorted(p for p in (work / "adapters").glob("a*") if p.is_dir())
    if len(adapters) < args.adapters:
        adapters = sb.build_adapters(base, work / "adapters", args.adapters, args.rank)
    adapters = adapters[: args.adapters]
    if not (work / "tenants.db").is_file():
        refs = sb.publish_all(base, adapters, work)[:-1]
        store = TenantStore.open(work / "tenants.db")
        keys = []
        for i, ref in enumerate(refs):
            _, key = store.add_tenant(f"t{i:03d}", base_access=True)
            store.set_alias(f"t{i:03d}", "bot", ref)
            keys.append(key)
        (work / "keys.json").write_text(json.dumps(keys))
    fixtures = work / "fixtures.json"  # a serving_bench.py workdir: its tenants, in the same order
    keys = json.loads((fixtures if fixtures.is_file() else work / "keys.json").read_text())
    if isinstance(keys, dict):
        keys = keys["keys"]
    opts = ServeOptions(
        base_dir=str(base),
        served_name="base",
        max_loras=args.max_loras,
        max_lora_rank=16,
        max_cpu_loras=max(args.adapters + 1, args.max_loras),
        max_model_len=256,
        registry=str(work / "registry"),
        tenants_db=str(work / "tenants.db"),
        cache_dir=str(work / "cache"),
        max_loaded=args.adapters + 1,
        log_path=str(work / "server.log"),
    )
    phases = {
        "base": [(keys[0], "base")],
        f"{args.adapters} adapters": [(k, "bot") for k in keys[: args.adapters]],
    }
    report_phases = {}
    with VLLMServer(opts) as server:
        warm = argparse.Namespace(**{**vars(args), "requests": args.adapters, "max_tokens": 2})
        sb.run_phase(server.url, [(k, "bot") for k in keys[: args.adapters]], warm, seed=1)
        pids = processes(server)
        for tag, jobs in phases.items():
            sb.run_phase(server.url, jobs, warm, seed=2)  # the batch shape settles before sampling
            spies = record(pids, args.rate, work, tag.replace(" ", "_"))
            result = sb.run_phase(server.url, jobs, args, seed=3)
            files = stop(spies)
            report_phases[tag] = {
                "tokens_per_s": result["tokens_per_s"],
                "api_server": summarize(files.pop("api_server"), API_BUCKETS),
                **{k: summarize(v, ENGINE_BUCKETS) for k, v in files.items()},
            }
            print(tag, json.dumps(report_phases[tag], indent=1))
    report = {
        "benchmark": "serving_profile",
        "command": " ".join(
            [Path(sys.argv[0]).as_posix().split("/")[-2] + "/" + Path(sys.argv[0]).name, *sys.argv[1:]]
        ),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "shared": os.environ.get("ADAPTERHUB_BENCH_QUIET") != "1",
            "load_average_start_end": [load_start, round(os.getloadavg()[0], 2)],
        },
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
            cpu_lora_ops.ENV_SWITCH: os.environ.get(cpu_lora_ops.ENV_SWITCH, "1"),
        },
        "phases": report_phases,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    out.write_text(json.dumps({**report, "provenance": provenance()}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
