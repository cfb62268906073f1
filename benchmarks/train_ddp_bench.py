"""Data-parallel training benchmark: tokens/s of N processes vs 1, and the all-reduce share of a step.

    .venv/bin/python benchmarks/train_ddp_bench.py [--processes 2] [--steps 8] [--batch-size 8]

Both runs train the same recipe (the capitals example on the embedded base, no dropout, constant LR)
with the same global batch: one process with ``--batch-size``, then ``--processes`` processes with
``batch-size / processes`` each, through `adapterhub train --processes N` (gloo on the CPU). Each run is
a fresh `adapterhub train`; the figures are the trainer's own record: ``tokens_per_second`` (all
processes' tokens over the main process's training time) and ``allreduce_seconds`` (time the main
process spent in collectives, waiting for the slower process included) as a share of ``train_seconds``.
The thread budget is split between processes (``OMP_NUM_THREADS`` = cores / processes), so on a machine
with few cores N processes compete for the same cores as one: expect no gain there; the point on a CPU
is that the path works and what the all-reduce costs. The loss curves of both runs are printed too.
Writes ``benchmarks/results/train_ddp_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from adapterhub_lite.examples import EXAMPLES_DIR

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def run(out: Path, processes: int, batch: int, steps: int) -> dict:
    cmd = [sys.executable, "-c", "from cli.main import app; app()", "train",
           str(EXAMPLES_DIR / "capitals" / "recipe.yaml"), "--output-dir", str(out), "--processes",
           str(processes), "--batch-size", str(batch), "--max-steps", str(steps), "--no-progress",
           "--set", "dropout=0", "--set", "lr_scheduler=constant",
           "--set", f"checkpoint_every={steps}"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    rec = json.loads((out / "training_record.json").read_text())
    state = json.loads(sorted((out / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    return {
        "processes": processes,
        "per_process_batch": batch,
        "tokens_per_second": rec["tokens_per_second"],
        "train_seconds": rec["train_seconds"],
        "allreduce_seconds": rec["allreduce_seconds"],
        "allreduce_share": round(rec["allreduce_seconds"] / rec["train_seconds"], 3),
        "losses": [round(x, 5) for _, x in state["losses"]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8, help="global micro-batch (divisible by processes)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        one = run(Path(tmp) / "one", 1, args.batch_size, args.steps)
        many = run(Path(tmp) / "many", args.processes, args.batch_size // args.processes, args.steps)
    result = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "note": "shared machine: other jobs ran at the same time; compare the ratio only",
        },
        "one": one,
        "many": many,
        "tokens_per_second_ratio": round(many["tokens_per_second"] / one["tokens_per_second"], 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    result = {**result, "provenance": provenance()}
    (args.out / "train_ddp_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"1 process: {one['tokens_per_second']} tokens/s; {args.processes} processes: "
          f"{many['tokens_per_second']} tokens/s ({result['tokens_per_second_ratio']}x); all-reduce "
          f"{many['allreduce_share']:.1%} of a step (shared machine: compare ratios only)")  # fmt: skip
    print("losses 1:", one["losses"])
    print(f"losses {args.processes}:", many["losses"])


if __name__ == "__main__":
    main()
