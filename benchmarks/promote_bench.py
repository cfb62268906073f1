"""Promote -> visible on another process's tenant store, on SQLite and on PostgreSQL.

A watcher process (standing in for a second server replica) holds its own `TenantStore` and polls
`data_version()` the way the middleware does before each request; this process moves an alias N times
and records, for each move, the time from calling `set_alias` to the watcher reading the new reference.
Also the cost of the probe itself against a full alias reload in the same process (the ratio is what a
request saves by probing instead of reloading).

    .venv/bin/python benchmarks/promote_bench.py [--moves 50]

Writes benchmarks/results/promote_bench.json. Timings on a shared machine are noisy; compare ratios.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pg_server import PG_BIN, PostgresServer  # noqa: E402

from adapterhub_lite.tenants.store import TenantStore  # noqa: E402

WATCHER = """
import sys, time
from adapterhub_lite.tenants.store import TenantStore
store = TenantStore.open(sys.argv[1])
seen, last = store.data_version(), None
print("ready", flush=True)
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    v = store.data_version()
    if v != seen:
        seen = v
        ref = store.aliases("acme").get("bot")
        if ref != last:
            last = ref
            print(f"{time.time():.6f} {ref}", flush=True)
            if ref == "acme/bot@0.0.0":
                break
    time.sleep(0.0005)
"""


def measure(location: str, moves: int) -> dict:
    store = TenantStore.open(location)
    store.add_tenant("acme")
    store.set_alias("acme", "bot", "acme/bot@1.0.0")
    watcher = subprocess.Popen(
        [sys.executable, "-c", WATCHER, location], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert watcher.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    lags = []
    for i in range(moves):
        ref = f"acme/bot@{2 + i}.0.0"
        t0 = time.time()
        store.set_alias("acme", "bot", ref)
        seen_at, seen_ref = watcher.stdout.readline().split()
        assert seen_ref == ref, (seen_ref, ref)
        lags.append((float(seen_at) - t0) * 1000)
        time.sleep(0.02)
    store.set_alias("acme", "bot", "acme/bot@0.0.0")
    watcher.wait(timeout=30)
    reader = TenantStore.open(location)
    reader.data_version()
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        reader.data_version()
    probe_us = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(200):
        reader.all_aliases()
    reload_us = (time.perf_counter() - t0) / 200 * 1e6
    reader.close()
    store.close()
    lags.sort()
    return {
        "moves": moves,
        "promote_to_visible_ms": {
            "p50": round(statistics.median(lags), 2),
            "p99": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))], 2),
            "max": round(lags[-1], 2),
        },
        "probe_us": round(probe_us, 2),
        "reload_all_aliases_us": round(reload_us, 1),
        "reload_over_probe": round(reload_us / probe_us, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moves", type=int, default=50)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "promote_bench.json")
    args = ap.parse_args()
    results: dict = {"machine": "shared 2-core machine (other jobs running): absolute times are noisy"}
    with tempfile.TemporaryDirectory(prefix="promote-bench-") as td:
        results["sqlite"] = measure(str(Path(td) / "tenants.db"), args.moves)
    if (PG_BIN / "initdb").exists():
        server = PostgresServer(Path(tempfile.mkdtemp(prefix="promote-bench-pg-")))
        try:
            server.init()
            results["postgresql"] = measure(server.new_database(), args.moves)
        finally:
            server.stop("immediate")
            shutil.rmtree(server.root, ignore_errors=True)
    else:
        results["postgresql"] = f"skipped: no PostgreSQL in {PG_BIN}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    args.out.write_text(json.dumps({**results, "provenance": provenance()}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
