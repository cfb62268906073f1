"""QLoRA on the CPU: resident memory and time step by step, with the recipe's `low_memory` off and on.

    .venv/bin/python benchmarks/qlora_rss_steps.py [--hidden 1536 --layers 18 --intermediate 4096]

The same random-init Llama (default 512M parameters) is loaded in 4-bit NF4 and wrapped in a rank-16
all-linear LoRA by the trainer's own `build_model`, with gradient checkpointing; each setting runs in
a fresh process, which trains `--steps` steps on fixed random batches and records RSS after loading
and after every step, the peak (VmHWM, reset after loading so that it is the training peak) and the
seconds per step. `low_memory` (adapterhub_lite/training/allocator.py) fixes glibc's mmap threshold;
without it the heap fragments and RSS climbs from step to step. Writes
``benchmarks/results/qlora_rss_steps.json`` and ``qlora_rss_steps.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args: argparse.Namespace) -> None:
    import torch

    from adapterhub_lite.training import recipe_from_dict
    from adapterhub_lite.training.allocator import low_memory_wanted, return_large_blocks_to_os
    from adapterhub_lite.training.model import build_model

    torch.set_num_threads(args.threads)
    recipe = recipe_from_dict(
        {
            "base": str(args.model_dir),
            "method": "qlora",
            "data": str(args.model_dir / "config.json"),  # not read: batches are made here
            "rank": 16,
            "alpha": 32,
            "gradient_checkpointing": True,
            "device": "cpu",
            "low_memory": args.low_memory == "on",
        }
    )
    if low_memory_wanted(recipe.low_memory, recipe.method, "cpu"):  # as train() decides, before loading
        return_large_blocks_to_os()
    model = build_model(recipe, args.model_dir, "cpu", torch.float32)
    loaded = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: the peak below is training's
        f.write("5")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    rss, seconds = [], []
    model.train()
    for _ in range(args.steps):
        batch = torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen)
        t0 = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(round(time.perf_counter() - t0, 2))
        rss.append(round(_status_mb("VmRSS"), 1))
    result = {
        "rss_after_load_mb": round(loaded, 1),
        "rss_after_step_mb": rss,
        "peak_rss_training_mb": round(_status_mb("VmHWM"), 1),
        "seconds_per_step": seconds,
    }
    args.json_out.write_text(json.dumps(result))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results["runs"].items():
        steps = range(1, len(r["rss_after_step_mb"]) + 1)
        ax1.plot(steps, r["rss_after_step_mb"], "o-", label=f"low_memory {name}")
        ax2.plot(steps, r["seconds_per_step"], "o-", label=f"low_memory {name}")
    ax1.set_xlabel("step")
    ax1.set_ylabel("RSS after the step (MiB)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("seconds per step")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"QLoRA on the CPU, {results['model']['parameters'] / 1e6:.0f}M-parameter Llama")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=18)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--low-memory", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    from benchmarks.train_bench import build_base

    runs = {}
    with tempfile.TemporaryDirectory(prefix="qlora_rss-") as tmp:
        model_dir = Path(tmp) / "base"
        n_params = build_base(model_dir, None, args.hidden, args.layers, args.intermediate, args.heads)
        print(f"random-init Llama: {n_params / 1e6:.1f}M parameters", flush=True)
        for setting in ("off", "on"):
            out = Path(tmp) / f"{setting}.json"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--low-memory",
                setting,
                "--model-dir",
                str(model_dir),
            ]
            cmd += ["--json-out", str(out), "--steps", str(args.steps), "--threads", str(args.threads)]
            cmd += ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stderr[-4000:])
                raise SystemExit(f"low_memory {setting} failed (exit {proc.returncode})")
            runs[setting] = json.loads(out.read_text())
            r = runs[setting]
            print(
                f"low_memory {setting:>3}: RSS by step {r['rss_after_step_mb']} MiB, training peak "
                f"{r['peak_rss_training_mb']} MiB, s/step {r['seconds_per_step']}",
                flush=True,
            )
    results = {
        "benchmark": "qlora_rss_steps",
        "model": {"parameters": n_params, "hidden": args.hidden, "layers": args.layers},
        "settings": {
            k: v for k, v in vars(args).items() if k in ("steps", "batch_size", "seq_len", "threads")
        },
        "runs": runs,
        "ratios": {
            "peak_on_over_off": round(
                runs["on"]["peak_rss_training_mb"] / runs["off"]["peak_rss_training_mb"], 3
            ),
            "step_time_on_over_off": round(
                sum(runs["on"]["seconds_per_step"][1:]) / sum(runs["off"]["seconds_per_step"][1:]), 3
            ),
        },
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    results = {**results, "provenance": provenance()}
    (args.out / "qlora_rss_steps.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out / "qlora_rss_steps.png")
    print(json.dumps(results["ratios"]))


if __name__ == "__main__":
    main()
