"""CPU multi-LoRA layers: vLLM's CPU punica wrapper against adapterhub's grouped one, in the same process.

    .venv/bin/python benchmarks/cpu_lora_ops_bench.py [--hidden 512] [--rank 16] [--max-loras 16]

One decoder layer's LoRA work as vLLM's CPU path runs it (qkv with three slices, o, gate_up with two,
down), with the batch's tokens spread over `--adapters` adapters, for decode batches (one token per
request) and prefill batches; next to it, the base layers' own GEMMs for the same tokens, which is the
floor the LoRA work is compared with. Implementations:

  reference  vLLM's `PunicaWrapperCPU` with its PyTorch reference ops (a weight copy per token);
  grouped    adapterhub's grouped wrapper (`adapterhub_lite/vllm_compat/lora_ops.py`).

Then what adapter churn costs the grouped path, per decoder layer (`churn` in the JSON): refreshing the
prepared weights after vLLM writes one slot, every slot rebuilt against the one slot written; and a
decode step of `--max-loras`/2 adapters in dense slots against the same adapters scattered over all the
slots (a product per slot up to the largest, or their weights gathered and kept from the step before).

Writes ``benchmarks/results/cpu_lora_ops_bench.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"


def time_call(fn, repeats: int, clock=time.perf_counter) -> float:
    """Median time of `fn()` over `repeats` calls, after one warm-up call. With one torch thread the
    clock is this thread's CPU time, which other work on a shared machine does not inflate."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return sorted(times)[len(times) // 2]


def decoder_layer_shapes(hidden: int, intermediate: int) -> list[tuple[int, tuple[int, ...]]]:
    """(in, output slices) of a Llama decoder layer's LoRA-wrapped linears."""
    return [
        (hidden, (hidden,) * 3),
        (hidden, (hidden,)),
        (hidden, (intermediate,) * 2),
        (intermediate, (hidden,)),
    ]


def main() -> None:
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from adapterhub_lite.vllm_compat.lora_ops import grouped_wrapper_class

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--rank", type=int, default=16, help="vLLM's --max-lora-rank (slots are padded to it)")
    ap.add_argument("--max-loras", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=16, help="distinct adapters in the batch")
    ap.add_argument("--tokens", default="1,8,32,128,512,2048", help="batch sizes in tokens")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="1 = as vLLM's CPU worker runs (one core)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    stock = (
        PunicaWrapperCPU.__mro__[1] if hasattr(PunicaWrapperCPU, "_adapterhub_grouping") else PunicaWrapperCPU
    )
    impls = {"reference": stock, "grouped": grouped_wrapper_class(stock)}
    gen = torch.Generator().manual_seed(0)
    layers = []
    for fan_in, slices in decoder_layer_shapes(args.hidden, args.intermediate):
        a = tuple(torch.randn(args.max_loras, 1, args.rank, fan_in, generator=gen) for _ in slices)
        b = tuple(torch.randn(args.max_loras, 1, out, args.rank, generator=gen) * 0.01 for out in slices)
        w = torch.randn(sum(slices), fan_in, generator=gen)
        layers.append((fan_in, slices, a, b, w))
    slot_ids = [100 + i for i in range(args.max_loras)]

    rows = []
    for n in [int(t) for t in args.tokens.split(",")]:
        xs = [torch.randn(n, fan_in, generator=gen) for fan_in, *_ in layers]
        ys = [torch.zeros(n, sum(slices)) for _, slices, *_ in layers]
        # decode: each token its own request; prefill: requests of up to 128 tokens, adapters in rotation
        per_request = 1 if n <= 64 else 128
        token_ids = tuple(slot_ids[(i // per_request) % args.adapters] for i in range(n))
        row = {"tokens": n}

        def base_gemms(xs=xs, ys=ys):
            for x, y, (_, _, _, _, w) in zip(xs, ys, layers, strict=True):
                torch.matmul(x, w.t(), out=y)

        row["base_gemm_ms"] = round(time_call(base_gemms, args.repeats, clock) * 1e3, 3)
        for name, cls in impls.items():
            wrapper = cls(max_num_batched_tokens=max(n, 8), max_batches=max(n, 8), device="cpu")
            wrapper.update_metadata(
                LoRAMapping(token_ids, token_ids, is_prefill=True), slot_ids, args.max_loras + 1, 32000
            )

            def lora(wrapper=wrapper, xs=xs, ys=ys):
                for x, y, (_, slices, a, b, _) in zip(xs, ys, layers, strict=True):
                    wrapper.add_lora_linear(y, x, a, b, 1.0, slices)

            row[f"{name}_ms"] = round(time_call(lora, args.repeats, clock) * 1e3, 3)
        row["speedup"] = round(row["reference_ms"] / row["grouped_ms"], 2)
        row["grouped_over_base_gemm"] = round(row["grouped_ms"] / row["base_gemm_ms"], 3)
        rows.append(row)
        print(
            f"{n:>5} tokens: base GEMMs {row['base_gemm_ms']:8.3f} ms  "
            f"LoRA: vLLM reference {row['reference_ms']:8.3f} ms  grouped {row['grouped_ms']:8.3f} ms  "
            f"(x{row['speedup']:.1f}; {row['grouped_over_base_gemm']:.2f} of the GEMMs)"
        )
    churn = churn_costs(layers, args, clock)
    result = {
        "benchmark": "cpu_lora_ops",
        "churn": churn,
        "command": " ".join(["benchmarks/cpu_lora_ops_bench.py", *sys.argv[1:]]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "clock": clock.__name__,
        "rows": rows,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "shared": os.environ.get("ADAPTERHUB_BENCH_QUIET") != "1",
            "load_average": round(os.getloadavg()[0], 2),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    result = {**result, "provenance": provenance()}
    (args.out / "cpu_lora_ops_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, args.out / "cpu_lora_ops_bench.png", args)
    print(f"wrote {args.out / 'cpu_lora_ops_bench.json'}")


def churn_costs(layers: list, args: argparse.Namespace, clock) -> dict:
    """Per decoder layer, ms: the prepared-weight refresh after one slot write (all slots / one slot), and
    decode with half the slots' adapters dense, scattered (a product per slot) and scattered but kept."""
    from adapterhub_lite.kernels import cpu_lora_ops as ops

    pairs = [(a, b, slices) for _, slices, a, b, _ in layers]
    gen = torch.Generator().manual_seed(1)

    def write(noted: bool) -> None:
        for a, b, _ in pairs:
            before = ops._versions(a, b)
            for t in (*a, *b):
                t[3].copy_(torch.randn(t[3].shape, generator=gen))
            if noted:
                ops.note_slot_write(a, b, 3, before)

    def refresh(noted: bool) -> float:
        times = []
        for _ in range(args.repeats):
            write(noted)
            t0 = clock()
            for a, b, slices in pairs:
                ops._prepared(a, b, slices)
            times.append(clock() - t0)
        return sorted(times)[len(times) // 2] * 1e3

    out = {"refresh_every_slot_ms": round(refresh(False), 3), "refresh_one_slot_ms": round(refresh(True), 3)}
    half = args.max_loras // 2
    n = 2 * half  # two decode rows per adapter
    xs = [torch.randn(n, fan_in, generator=gen) for fan_in, *_ in layers]
    scattered = torch.randperm(args.max_loras, generator=gen)[:half].sort().values
    for name, slots, steady in (
        ("decode_dense_ms", torch.arange(half), False),
        ("decode_scattered_ms", scattered, False),
        ("decode_scattered_kept_ms", scattered, True),
    ):
        idx = slots[torch.arange(n) % half]
        g = ops.group_rows(idx, ops.group_rows(idx) if steady else None)

        def step(g=g):
            for x, (a, b, slices) in zip(xs, pairs, strict=True):
                ops.lora_linear(torch.zeros(n, sum(slices)), x, g, a, b, 1.0, slices)

        out[name] = round(time_call(step, args.repeats, clock) * 1e3, 3)
    print("churn, per decoder layer (ms):", out)
    return out


def plot(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [r["tokens"] for r in rows]
    ax.plot(xs, [r["reference_ms"] for r in rows], "o-", label="LoRA, vLLM CPU reference")
    ax.plot(xs, [r["grouped_ms"] for r in rows], "s-", label="LoRA, adapterhub grouped")
    ax.plot(xs, [r["base_gemm_ms"] for r in rows], "k--", label="base layers' GEMMs (floor)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens in the batch")
    ax.set_ylabel("ms per decoder layer")
    ax.set_title(
        f"CPU multi-LoRA: {args.adapters} adapters in the batch, rank {args.rank}, hidden {args.hidden}",
        fontsize=10,
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
