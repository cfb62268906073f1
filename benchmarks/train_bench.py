"""Training benchmark: QLoRA vs LoRA (peak RSS, tokens/s), and our trainer vs transformers `Trainer` + peft.

    .venv/bin/python benchmarks/train_bench.py [--device cpu|cuda] [--steps 10] [--batch-size 4]

A random-init Llama of at least 50M parameters (hidden 768, 8 layers by default) with the embedded base's
tokenizer is saved to a scratch directory; every variant then trains the same rank-16 all-linear LoRA on
the same fixed-length sequences with the same settings, each in a fresh subprocess so that one variant's
peak memory cannot leak into another's:

- ``ours-lora``: `adapterhub_lite.training.train`, base in full precision (fp32 on CPU, bf16 on CUDA)
- ``ours-qlora``: the same trainer, base in 4-bit NF4 (bitsandbytes, double quantization)
- ``hf-lora``: the standard recipe, `transformers.Trainer` over a `peft` model, same model and data

Targets (issue 2): QLoRA peak memory <= 0.4x LoRA's; our tokens/s >= 1.0x the standard recipe's.
Peak RSS is reported whole and above the process's RSS after imports (the torch/transformers runtime,
some 400-600 MB that no method can save), since that fixed cost dominates a model this small on a CPU.
The 4-bit load reads one full-precision tensor at a time (`load_base`), but activations, not weights,
dominate a model this small: the weights' own footprint (`get_memory_footprint`, full precision vs NF4) is
reported beside the peaks, ``--hidden/--layers/--intermediate/--heads`` make a larger model, and
``--gradient-checkpointing`` (every variant) trades activations for recomputation.
Writes ``benchmarks/results/train_bench.json`` and ``train_bench.png``.
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
VARIANTS = ("ours-lora", "ours-qlora", "hf-lora")


def rss_now_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    # The trainer's own measure (VmHWM, not ru_maxrss: see adapterhub_lite/training/record.py).
    from adapterhub_lite.training.record import peak_rss_mb as vm_hwm_mb

    return vm_hwm_mb()


# --------------------------------------------------------------------------------------------- setup


def build_base(out: Path, tok_dir, hidden: int, layers: int, intermediate: int, heads: int) -> int:
    """Save a random-init Llama with the embedded tokenizer to ``out``; returns its parameter count."""
    from adapterhub_lite.base import load_tokenizer
    from adapterhub_lite.base.pretrain import PretrainConfig, build_model

    tok = load_tokenizer(tok_dir)
    cfg = PretrainConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    model = build_model(cfg, tok, seed=0)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def build_data(path: Path, eval_path: Path, tok_dir, n: int, seq_len: int) -> None:
    """Raw-text lines that each tokenize to exactly ``seq_len`` ids (BOS + text + EOS): no padding."""
    from adapterhub_lite.base import load_tokenizer
    from adapterhub_lite.base.world import source_documents

    tok = load_tokenizer(tok_dir)
    stream = " ".join(source_documents(n * 8, seed=123))
    ids = tok.encode(stream, add_special_tokens=False)
    rows, pos = [], 0
    while len(rows) < n + 4 and pos + seq_len < len(ids):
        text = tok.decode(ids[pos : pos + seq_len - 2]).strip()
        pos += seq_len - 2
        if len(tok.encode(text, add_special_tokens=False)) == seq_len - 2:
            rows.append({"text": text})
    if len(rows) < n + 4:
        raise SystemExit("could not build enough fixed-length sequences")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in rows[n : n + 4]))


# --------------------------------------------------------------------------------------------- children


def run_ours(args, method: str) -> dict:
    from adapterhub_lite.training import recipe_from_dict, train

    rss_imports = rss_now_mb()
    recipe = recipe_from_dict(
        {
            "name": f"bench-{method}",
            "base": str(args.model_dir),
            "method": method,
            "data": str(args.data),
            "eval_data": str(args.eval_data),
            "format": "text",
            "rank": args.rank,
            "alpha": 2 * args.rank,
            "dropout": 0.05,
            "learning_rate": 1e-4,
            "lr_scheduler": "cosine",
            "max_steps": args.steps,
            "batch_size": args.batch_size,
            "max_seq_len": args.seq_len,
            "eval_batch_size": args.batch_size,
            "device": args.device,
            "gradient_checkpointing": args.gradient_checkpointing,
            "low_memory": {"auto": None, "on": True, "off": False}[args.low_memory],
            "checkpoint_every": 10**6,  # only the final one, as the Trainer saves none
            "output_dir": str(args.work / f"out-{method}"),
        }
    )
    result = train(recipe, progress=False, overwrite=True)
    rec = result.record
    return {
        "tokens_per_second": rec["tokens_per_second"],
        "train_seconds": rec["train_seconds"],
        "final_train_loss": rec["final_train_loss"],
        "trainable_parameters": rec["trainable_parameters"],
        "rss_after_imports_mb": round(rss_imports, 1),
        "peak_gpu_mb": rec.get("peak_gpu_mb"),
    }


def run_hf(args) -> dict:
    """The standard recipe: transformers.Trainer over get_peft_model, on the same sequences."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from adapterhub_lite.base import load_base, load_tokenizer
    from adapterhub_lite.data import collate, load_dataset, tokenize_examples

    rss_imports = rss_now_mb()
    tok = load_tokenizer(args.model_dir)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    torch.manual_seed(0)
    model = load_base(args.model_dir, dtype=dtype, device=device)
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.05,
            target_modules="all-linear",
            bias="none",
            task_type="CAUSAL_LM",
        ),
        autocast_adapter_dtype=True,
    )
    feats = tokenize_examples(load_dataset(args.data, "text").examples, tok, args.seq_len)
    rows = [{"input_ids": f.input_ids, "labels": f.labels} for f in feats]
    counted = {"tokens": 0}

    def collator(batch):
        from adapterhub_lite.data import Features

        out = collate([Features(b["input_ids"], b["labels"], 0) for b in batch], tok.pad_token_id)
        counted["tokens"] += int(out["attention_mask"].sum())
        return out

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.t0

    clock = Clock()
    targs = TrainingArguments(
        output_dir=str(args.work / "hf-out"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=max(1, args.steps),
        save_strategy="no",
        report_to=[],
        use_cpu=device == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        seed=0,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[clock])
    out = trainer.train()
    peak_gpu = round(torch.cuda.max_memory_allocated() / 2**20, 1) if device == "cuda" else None
    return {
        "tokens_per_second": round(counted["tokens"] / clock.seconds, 1),
        "train_seconds": round(clock.seconds, 2),
        "final_train_loss": out.training_loss,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "rss_after_imports_mb": round(rss_imports, 1),
        "peak_gpu_mb": peak_gpu,
    }


def child(args) -> None:
    # The same imports in every variant before the baseline RSS is read, so "above imports" compares alike.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import adapterhub_lite.training  # noqa: F401

    torch.set_num_threads(args.threads)
    res = run_hf(args) if args.child == "hf-lora" else run_ours(args, args.child.removeprefix("ours-"))
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    res["peak_rss_above_imports_mb"] = round(res["peak_rss_mb"] - res["rss_after_imports_mb"], 1)
    args.json_out.write_text(json.dumps(res))


# --------------------------------------------------------------------------------------------- parent


def weights_footprint(model_dir: Path, device: str) -> dict:
    """MiB of the base's weights as each method loads them (transformers' `get_memory_footprint`)."""
    import gc

    from adapterhub_lite.base import load_base

    out = {}
    for quantization in ("none", "nf4"):
        model = load_base(model_dir, quantization=quantization, device=device)
        out[quantization] = round(model.get_memory_footprint() / 2**20, 1)
        del model
        gc.collect()
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    v = results["variants"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    whole = [v[n]["peak_rss_mb"] for n in names]
    above = [v[n]["peak_rss_above_imports_mb"] for n in names]
    axes[0].bar(names, whole, color="lightgray", label="peak RSS")
    axes[0].bar(names, above, color="tab:blue", label="above the runtime after imports")
    axes[0].set_ylabel("MiB")
    axes[0].set_title(
        f"peak memory (QLoRA/LoRA: {results['ratios']['qlora_vs_lora_peak_rss']:.2f} whole, "
        f"{results['ratios']['qlora_vs_lora_peak_rss_above_imports']:.2f} above runtime;\n"
        f"weights alone: {results['ratios']['qlora_vs_lora_weights_footprint']:.2f})",
        fontsize=9,
    )
    axes[0].legend(fontsize=8)
    axes[1].bar(
        names, [v[n]["tokens_per_second"] for n in names], color=["tab:green", "tab:olive", "tab:gray"]
    )
    axes[1].set_ylabel("training tokens / s")
    axes[1].set_title(
        f"throughput (ours/Trainer: {results['ratios']['ours_vs_trainer_tokens_per_second']:.2f})", fontsize=9
    )
    m = results["model"]
    fig.suptitle(
        f"{m['parameters'] / 1e6:.0f}M-param random Llama, {results['settings']['device']}, "
        f"{results['settings']['steps']} steps x {results['settings']['batch_size']} x "
        f"{results['settings']['seq_len']} tokens, LoRA rank {results['settings']['rank']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute activations (every variant)"
    )
    ap.add_argument(
        "--low-memory",
        choices=["auto", "on", "off"],
        default="auto",
        help="this trainer's recipe field low_memory (auto: on for QLoRA on the CPU)",
    )
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; the best one counts")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the embedded base's)")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="suffix of the result files (train_bench_TAG.json)")
    # internal: one variant in a fresh process
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--eval-data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="train_bench-") as tmp:
        work = Path(tmp)
        model_dir, data, eval_data = work / "base", work / "train.jsonl", work / "eval.jsonl"
        t0 = time.time()
        n_params = build_base(
            model_dir, args.tokenizer, args.hidden, args.layers, args.intermediate, args.heads
        )
        if n_params < 50_000_000:
            print(f"warning: {n_params:,} parameters; issue 2 asks for at least 50M", file=sys.stderr)
        build_data(data, eval_data, args.tokenizer, n=args.steps * args.batch_size, seq_len=args.seq_len)
        print(
            f"random-init Llama: {n_params / 1e6:.1f}M parameters ({time.time() - t0:.0f}s to build)",
            flush=True,
        )
        runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
        # Interleaved rounds; the best round of each variant counts (the least disturbed by other load).
        for name in [n for _ in range(args.repeats) for n in VARIANTS]:
            out = work / f"{name}.json"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                "--device",
                args.device,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--seq-len",
                str(args.seq_len),
                "--rank",
                str(args.rank),
                "--threads",
                str(args.threads),
                *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
                "--low-memory",
                args.low_memory,
                "--model-dir",
                str(model_dir),
                "--data",
                str(data),
                "--eval-data",
                str(eval_data),
                "--work",
                str(work),
                "--json-out",
                str(out),
            ]
            t1 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
                raise SystemExit(f"variant {name} failed (exit {proc.returncode})")
            v = json.loads(out.read_text())
            runs[name].append(v)
            print(
                f"{name:>10}: {v['tokens_per_second']:>8.1f} tokens/s  peak RSS {v['peak_rss_mb']:>7.1f} MiB "
                f"({v['peak_rss_above_imports_mb']:.1f} above imports)  loss {v['final_train_loss']:.3f}  "
                f"[{time.time() - t1:.0f}s]",
                flush=True,
            )

        footprint = weights_footprint(model_dir, args.device)
    variants = {}
    for name, rs in runs.items():
        best = max(rs, key=lambda r: r["tokens_per_second"])
        variants[name] = {
            **best,
            "tokens_per_second_all": [r["tokens_per_second"] for r in rs],
            # Peaks vary by a few hundred MiB between identical rounds (allocator, thread timing): the
            # lowest is the variant's own need, all of them are kept.
            "peak_rss_mb": min(r["peak_rss_mb"] for r in rs),
            "peak_rss_above_imports_mb": min(r["peak_rss_above_imports_mb"] for r in rs),
            "peak_rss_mb_all": [r["peak_rss_mb"] for r in rs],
        }
    lora, qlora, hf = variants["ours-lora"], variants["ours-qlora"], variants["hf-lora"]
    ratios = {
        "qlora_vs_lora_peak_rss": round(qlora["peak_rss_mb"] / lora["peak_rss_mb"], 3),
        "qlora_vs_lora_peak_rss_above_imports": round(
            qlora["peak_rss_above_imports_mb"] / lora["peak_rss_above_imports_mb"], 3
        ),
        "qlora_vs_lora_tokens_per_second": round(qlora["tokens_per_second"] / lora["tokens_per_second"], 3),
        "ours_vs_trainer_tokens_per_second": round(lora["tokens_per_second"] / hf["tokens_per_second"], 3),
    }
    ratios["qlora_vs_lora_weights_footprint"] = round(footprint["nf4"] / footprint["none"], 3)
    if args.device == "cuda" and lora.get("peak_gpu_mb") and qlora.get("peak_gpu_mb"):
        ratios["qlora_vs_lora_peak_gpu_memory"] = round(qlora["peak_gpu_mb"] / lora["peak_gpu_mb"], 3)
    results = {
        "benchmark": "train_bench",
        "model": {
            "parameters": n_params,
            "hidden": args.hidden,
            "layers": args.layers,
            "intermediate": args.intermediate,
            "heads": args.heads,
            "init": "random",
        },
        "settings": {
            "device": args.device,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "rank": args.rank,
            "target_modules": "all-linear",
            "threads": args.threads,
            "gradient_checkpointing": args.gradient_checkpointing,
            "low_memory": args.low_memory,
            "repeats": args.repeats,
            "compute_dtype": "bfloat16" if args.device == "cuda" else "float32",
        },
        "variants": variants,
        "weights_footprint_mb": footprint,
        "ratios": ratios,
        "targets": {
            "qlora_vs_lora_peak_memory_at_most": 0.4,
            "ours_vs_trainer_tokens_per_second_at_least": 1.0,
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    suffix = ("" if args.device == "cpu" else f"_{args.device}") + (f"_{args.tag}" if args.tag else "")
    json_path, png_path = args.out / f"train_bench{suffix}.json", args.out / f"train_bench{suffix}.png"
    from provenance import provenance  # benchmarks/ is sys.path[0] for a script run as a file

    json_path.write_text(json.dumps({**results, "provenance": provenance()}, indent=2) + "\n")
    plot(results, png_path)
    print(json.dumps(ratios, indent=2))
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
