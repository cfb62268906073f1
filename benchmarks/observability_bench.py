"""Observability benchmark: what the usage ledger costs a serving server, and how far its writes are from
being the bottleneck.

(a) Throughput with the ledger on against off, on the serving benchmark's 16-adapter phase (16 tenants'
    adapters in rotation, 32 closed-loop streaming clients, the same model and fixtures as
    benchmarks/serving_bench.py): two servers run side by side, one with `ADAPTERHUB_USAGE_LEDGER=0`,
    and the phases alternate on/off, off/on round after round (medians), so load that drifts on a shared
    machine does not favour either. Key `ledger_over_off_throughput` (goal >= 0.97).
    The same rounds run a third server with tracing on (serving/tracing.py: every trace sampled, the
    gateway's spans and vLLM's own exported over OTLP/HTTP to a receiver in this script on loopback, which
    decodes and counts them) and the ledger off, against the same "off" server (ledger and tracing off):
    key `tracing_over_off_throughput` (goal >= 0.97).
(b) The ledger's write rate: rows per second its writer puts into SQLite (the tenant store's file, WAL,
    synchronous=FULL) and into PostgreSQL (a throwaway server, tests/pg_server.py), one batch per flush
    window, against the request rate measured in (a): `headroom` = write rate / request rate.

    .venv/bin/python benchmarks/observability_bench.py            # ~8 min (+3 to build fixtures)
    .venv/bin/python benchmarks/observability_bench.py --quick    # proves it runs

Writes benchmarks/results/observability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from serving_bench import fixtures  # noqa: E402
from serving_load import run_phase  # noqa: E402

from adapterhub_lite.serving.gateway.ledger import ENV_LEDGER, UsageLedger  # noqa: E402
from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer  # noqa: E402
from adapterhub_lite.tenants.usage_store import UsageEvent, UsageStore  # noqa: E402

GOAL = 0.97
ADAPTERS = 16


def parse_args() -> argparse.Namespace:
    defaults = ServeOptions(base_dir="")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=128, help="requests per measured phase")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=defaults.max_loras)
    p.add_argument("--max-cpu-loras", type=int, default=defaults.max_cpu_loras)
    p.add_argument("--repeats", type=int, default=4, help="rounds (on/off order alternates); medians")
    p.add_argument("--write-rows", type=int, default=20000, help="rows per database in the write test")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tokenizer-from", default=None)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "observability.json"))
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    if args.quick:
        args.requests, args.repeats, args.write_rows = 48, 2, 3000
    return args


class SpanSink:
    """An OTLP/HTTP receiver on loopback: decodes each `POST /v1/traces` and counts spans by name."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.counts: dict[str, int] = {}
        lock = threading.Lock()
        counts = self.counts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                request = ExportTraceServiceRequest.FromString(
                    self.rfile.read(int(self.headers.get("content-length", 0))))
                with lock:
                    for rs in request.resource_spans:
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                counts[span.name] = counts.get(span.name, 0) + 1
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *a: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def throughput(args: argparse.Namespace, work: Path) -> dict:
    _, _, _, _, _, keys = fixtures(args, work, ADAPTERS + 1)
    max_cpu_loras = max(args.max_cpu_loras, args.max_loras)

    sink = SpanSink()

    def options(name: str) -> ServeOptions:
        return ServeOptions(
            otlp_endpoint=sink.url if name == "tracing" else None,
            base_dir=str(work / "base"), served_name="base", max_loras=args.max_loras, max_lora_rank=16,
            max_cpu_loras=max_cpu_loras, max_model_len=256, registry=str(work / "registry"),
            tenants_db=str(work / "tenants.db"), cache_dir=str(work / f"cache-{name}"),
            max_loaded=max_cpu_loras, log_path=str(work / f"{name}.log"),
        )

    jobs = [(k, "bot") for k in keys[:ADAPTERS]]
    runs: dict[str, list[dict]] = {"on": [], "off": [], "tracing": []}
    servers = {name: VLLMServer(options(name)) for name in runs}
    servers["off"].env[ENV_LEDGER] = "0"
    servers["tracing"].env[ENV_LEDGER] = "0"  # tracing's cost alone
    store = UsageStore(work / "tenants.db")
    try:
        for s in servers.values():
            s.start()
        warm = argparse.Namespace(**{**vars(args), "requests": ADAPTERS, "max_tokens": 2})
        for s in servers.values():
            run_phase(s.url, jobs, warm, seed=1)  # every adapter pulled, verified and loaded once
        for rep in range(args.repeats):
            order = [["on", "off", "tracing"], ["tracing", "off", "on"], ["off", "tracing", "on"],
                     ["on", "tracing", "off"]][rep % 4]
            for name in order:
                s = servers[name]
                rows_before = store.counts()[0]
                r = run_phase(s.url, jobs, args, seed=100 + rep, metrics_key=s.admin_key)
                # rows land within a flush window (1 s), so a phase's count straddles its neighbours;
                # the exact check is the total at the end (ledger_rows_written)
                r["ledger_rows_during"] = store.counts()[0] - rows_before
                runs[name].append(r)
                print(f"round {rep} {name:>7}: {r['tokens_per_s']:8.1f} tok/s  "
                      f"TTFT p50 {r['ttft_p50_ms']:.0f} ms  rows +{r['ledger_rows_during']}", flush=True)
    finally:
        for s in servers.values():
            s.stop()  # a clean stop flushes the tracing server's last spans
        sink.close()
    rows_total = store.counts()[0]

    def med(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[name]), 2)

    ratios = [on["tokens_per_s"] / off["tokens_per_s"]
              for on, off in zip(runs["on"], runs["off"], strict=True)]
    traced = [t["tokens_per_s"] / off["tokens_per_s"]
              for t, off in zip(runs["tracing"], runs["off"], strict=True)]
    traced_requests = ADAPTERS + sum(r["requests"] for r in runs["tracing"])
    return {
        "tokens_per_s_on": med("on", "tokens_per_s"),
        "tokens_per_s_off": med("off", "tokens_per_s"),
        "ttft_p50_ms_on": med("on", "ttft_p50_ms"),
        "ttft_p50_ms_off": med("off", "ttft_p50_ms"),
        "requests_per_s_on": round(statistics.median(r["requests"] / r["wall_s"] for r in runs["on"]), 2),
        "ratio_per_round": [round(x, 3) for x in ratios],
        "ledger_over_off_throughput": round(statistics.median(ratios), 3),
        "tokens_per_s_tracing": med("tracing", "tokens_per_s"),
        "ttft_p50_ms_tracing": med("tracing", "ttft_p50_ms"),
        "tracing_ratio_per_round": [round(x, 3) for x in traced],
        "tracing_over_off_throughput": round(statistics.median(traced), 3),
        # what the receiver got from the tracing server: one gateway root span per request it was sent
        # (warm-ups included) and vLLM's own llm_request spans
        "spans_received": dict(sorted(sink.counts.items())),
        "requests_sent_to_tracing_server": traced_requests,
        # every request of the ledger-on server (warm-ups included) became a row; the off server wrote none
        "ledger_rows_written": rows_total,
        "requests_sent_to_ledger_on_server": ADAPTERS + sum(r["requests"] for r in runs["on"]),
        "runs": runs,
    }


def write_rate(location: str, rows: int, batch: int) -> dict:
    """Rows/s the ledger's writer sustains into `location`, in batches of `batch` (one flush window)."""
    store = UsageStore(location)
    now = time.time()
    events = [
        UsageEvent(uuid.uuid4().hex, now, f"t{i % 16:03d}", "bot", f"t{i % 16:03d}/bot@1.0.0", 200,
                   32, 32, 250.0, "bench:1")
        for i in range(rows)
    ]
    t0 = time.perf_counter()
    for i in range(0, rows, batch):
        store.write(events[i : i + batch])
    batched = rows / (time.perf_counter() - t0)
    # The writer end to end (queue, thread, batches of up to BATCH_MAX): record everything, then a stop.
    more = [UsageEvent(uuid.uuid4().hex, now, e.tenant, e.alias, e.ref, 200, 32, 32, 250.0, "bench:1")
            for e in events]
    ledger = UsageLedger(store, flush_seconds=0.05, queue_max=len(more) + 1)
    t0 = time.perf_counter()
    for e in more:
        ledger.record(e)
    record_us = (time.perf_counter() - t0) / len(more) * 1e6
    ledger.close()
    writer = rows / (time.perf_counter() - t0)
    assert store.counts()[0] == 2 * rows and ledger.dropped == 0
    store.close()
    return {
        f"rows_per_s_batches_of_{batch}": round(batched),
        "rows_per_s_writer": round(writer),
        "record_call_us": round(record_us, 2),
    }


def write_rates(args: argparse.Namespace, work: Path, request_rate: float) -> dict:
    batch = max(1, round(request_rate))  # the rows one 1-second flush window holds at that rate
    out = {"batch_rows": batch, "sqlite": write_rate(str(work / "ledger-bench.db"), args.write_rows, batch)}
    try:
        from pg_server import PostgresServer

        pg = PostgresServer(Path(tempfile.mkdtemp(prefix="ahl-obs-pg-")))
        pg.init()
        try:
            out["postgresql"] = write_rate(pg.new_database(), args.write_rows, batch)
        finally:
            pg.stop()
    except Exception as exc:  # noqa: BLE001 - no PostgreSQL binaries here: say so in the report
        out["postgresql"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    for db in ("sqlite", "postgresql"):
        if f"rows_per_s_batches_of_{batch}" in out[db]:
            out[db]["headroom"] = round(out[db][f"rows_per_s_batches_of_{batch}"] / request_rate, 1)
    return out


def main() -> None:
    args = parse_args()
    load_start = round(os.getloadavg()[0], 2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ahl-obs-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}", flush=True)
    tp = throughput(args, work)
    writes = write_rates(args, work, tp["requests_per_s_on"])
    report = {
        "benchmark": "observability",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start_end": [load_start, round(os.getloadavg()[0], 2)],
            "shared": os.environ.get("ADAPTERHUB_BENCH_QUIET") != "1",
        },
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
        "targets": {"ledger_over_off_throughput": f">= {GOAL}", "tracing_over_off_throughput": f">= {GOAL}"},
        "verdict": {"ledger_over_off_throughput": tp["ledger_over_off_throughput"] >= GOAL,
                    "tracing_over_off_throughput": tp["tracing_over_off_throughput"] >= GOAL},
        "ledger_over_off_throughput": tp["ledger_over_off_throughput"],
        "tracing_over_off_throughput": tp["tracing_over_off_throughput"],
        "throughput_16_adapters": tp,
        "ledger_write_rate": writes,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    out.write_text(json.dumps({**report, "provenance": provenance()}, indent=2) + "\n")
    keys = ("ledger_over_off_throughput", "tracing_over_off_throughput", "verdict")
    print(json.dumps({k: report[k] for k in keys}, indent=2))
    print(json.dumps(writes, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
