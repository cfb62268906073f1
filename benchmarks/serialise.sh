#!/usr/bin/env bash
# Run one benchmark at a time on a shared machine: waits for the lock, then runs the command holding it.
#
#   benchmarks/serialise.sh .venv/bin/python benchmarks/serving_bench.py --quick
#
# The lock file is $AHL_BENCH_LOCK (default: $TMPDIR/ahl-heavy.lock, the same lock the project's heavy
# tests take), so a benchmark never overlaps another benchmark or a test that starts vLLM or trains.
# It also sets ADAPTERHUB_BENCH_QUIET=1, which the benchmarks record as "the machine was held".
set -euo pipefail
[ "$#" -ge 1 ] || { echo "usage: benchmarks/serialise.sh COMMAND [ARGS...]" >&2; exit 64; }
lock="${AHL_BENCH_LOCK:-${TMPDIR:-/tmp}/ahl-heavy.lock}"
echo "waiting for $lock (load average: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
export ADAPTERHUB_BENCH_QUIET=1
exec flock "$lock" "$@"
