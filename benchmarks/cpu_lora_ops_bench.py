"""CPU multi-LoRA ops: adapterhub's grouped ops vs vLLM's PyTorch reference ops, in the same process.

    .venv/bin/python benchmarks/cpu_lora_ops_bench.py [--hidden 512] [--rank 8] [--max-loras 8]

One LoRA-wrapped linear layer as vLLM's CPU punica wrapper runs it (shrink by the stacked A matrices,
then expand by the stacked B matrices), for decode batches (one token per request) and prefill batches
(many tokens per request), with the tokens spread over `--max-loras` adapters. Reports the time per
call of each and the speedup. Writes ``benchmarks/results/cpu_lora_ops_bench.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def time_call(fn, args: tuple, repeats: int) -> float:
    """Best wall time of `fn(*args)` over `repeats` calls, after one warm-up call."""
    fn(*args)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best


def lora_layer(ops, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, y: torch.Tensor, idx) -> None:
    """One LoRA linear as the CPU punica wrapper runs it: shrink by A, then add the expand by B."""
    mid = torch.zeros(x.shape[0], a.shape[2])
    ops.bgmv_shrink(x, a, mid, idx, 1.0)
    ops.bgmv_expand(mid, b, y, idx, True)


def main() -> None:
    from vllm.lora.ops.torch_ops import lora_ops as ref

    from adapterhub_lite.serving import cpu_lora_ops as grouped

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--out-features", type=int, default=1408)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--tokens", default="1,8,32,256,1024", help="batch sizes in tokens")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(args.max_loras, 1, args.rank, args.hidden, generator=gen)
    b = torch.randn(args.max_loras, 1, args.out_features, args.rank, generator=gen)

    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(n, args.hidden, generator=gen)
        idx = torch.randint(0, args.max_loras, (n,), generator=gen)
        y = torch.zeros(n, args.out_features)

        t_ref = time_call(lora_layer, (ref, x, a, b, y, idx), args.repeats)
        t_grouped = time_call(lora_layer, (grouped, x, a, b, y, idx), args.repeats)
        rows.append(
            {
                "tokens": n,
                "reference_ms": round(t_ref * 1e3, 3),
                "grouped_ms": round(t_grouped * 1e3, 3),
                "speedup": round(t_ref / t_grouped, 2),
            }
        )
        print(
            f"{n:>5} tokens: vLLM reference {t_ref * 1e3:8.3f} ms  grouped {t_grouped * 1e3:8.3f} ms  "
            f"x{t_ref / t_grouped:.1f}"
        )
    result = {
        "benchmark": "cpu_lora_ops",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": rows,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cpu_lora_ops_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / "cpu_lora_ops_bench.png", args)
    print(f"wrote {args.out / 'cpu_lora_ops_bench.json'}")


def plot(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r["tokens"] for r in rows]
    ax.plot(xs, [r["reference_ms"] for r in rows], "o-", label="vLLM torch_ops (reference)")
    ax.plot(xs, [r["grouped_ms"] for r in rows], "s-", label="adapterhub grouped ops")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the batch")
    ax.set_ylabel("ms per LoRA linear (shrink + expand)")
    ax.set_title(
        f"CPU multi-LoRA, {args.max_loras} adapters, rank {args.rank}, {args.hidden}->{args.out_features}"
    )
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
