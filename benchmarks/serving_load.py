"""Fixtures and load generation for the serving benchmarks (serving_bench.py, serving_profile.py).

A random-init Llama base, random PEFT adapters on every linear layer, a registry and tenants; closed-loop
streaming clients over HTTP; the naive transformers + peft alternative.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import threading
import time
from pathlib import Path

import httpx

from adapterhub_lite.tenants import TenantStore

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB_IDS = 1000  # prompt token ids are drawn below this: inside any tokenizer the base may have
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


# -- fixtures: a random-init base, random adapters, a registry, tenants --------------------------------


def build_base(args: argparse.Namespace, out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterhub_lite.base import resolve_base_dir

    src = resolve_base_dir(args.tokenizer_from)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


def build_adapters(base: Path, out: Path, count: int, rank: int) -> list[Path]:
    """`count` PEFT adapters: one made with peft, the rest the same tensors re-drawn at random."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    first = out / "a000"
    peft_model.save_pretrained(first)
    template = load_file(first / "adapter_model.safetensors")
    dirs = []
    for i in range(count):
        d = out / f"a{i:03d}"
        d.mkdir(parents=True, exist_ok=True)
        if d != first:
            shutil.copy(first / "adapter_config.json", d / "adapter_config.json")
        gen = torch.Generator().manual_seed(1000 + i)
        tensors = {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in template.items()}
        save_file(tensors, d / "adapter_model.safetensors", metadata={"format": "pt"})
        dirs.append(d)
    return dirs


def publish_all(base: Path, adapters: list[Path], work: Path) -> list[str]:
    from tqdm import tqdm

    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry

    reg = open_registry(work / "registry")
    refs = []
    for i, d in enumerate(tqdm(adapters, desc="pack+publish", unit="adapter")):
        bundle = pack_bundle(
            d, work / "bundles" / d.name, namespace=f"t{i:03d}", name="bot", version="1.0.0", base_dir=base
        )
        refs.append(reg.publish(bundle).ref)
    # hot-swap targets: a second version for tenant 0
    bundle = pack_bundle(
        adapters[-1], work / "bundles" / "swap", namespace="t000", name="bot", version="2.0.0", base_dir=base
    )
    refs.append(reg.publish(bundle).ref)
    return refs


# -- load generation -----------------------------------------------------------------------------------


def run_phase(
    url: str,
    jobs: list[tuple[str | None, str]],
    args: argparse.Namespace,
    seed: int,
    metrics_key: str | None = None,
) -> dict:
    """Send `args.requests` streamed completions, `concurrency` at a time; jobs rotate (key, model).
    `metrics_key`: the admin key, where /metrics sits behind adapterhub's middleware."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, VOCAB_IDS) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    lock = threading.Lock()
    next_i = [0]
    ttfts: list[float] = []
    tokens = [0]
    errors: list[str] = []

    def worker() -> None:
        try:
            _worker()
        except Exception as exc:  # a dead client thread must fail the phase, not shrink it
            errors.append(repr(exc))

    def _worker() -> None:
        with httpx.Client(timeout=300) as client:
            while True:
                with lock:
                    i = next_i[0]
                    next_i[0] += 1
                if i >= args.requests:
                    return
                key, model = jobs[i % len(jobs)]
                body = {
                    "model": model,
                    "prompt": prompts[i],
                    "max_tokens": args.max_tokens,
                    "temperature": 0,
                    "stream": True,
                    "ignore_eos": True,
                    "stream_options": {"include_usage": True},
                }
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                t0 = time.perf_counter()
                first = None
                with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as resp:
                    if resp.status_code != 200:
                        errors.append(f"{resp.status_code} {resp.read()[:200]!r}")
                        continue
                    for line in resp.iter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(f"error event in stream: {chunk['error']}")
                        # a chunk carries one token; its text may be empty (an incomplete UTF-8 byte sequence)
                        if first is None and chunk.get("choices"):
                            first = time.perf_counter() - t0
                        if chunk.get("usage"):
                            with lock:
                                tokens[0] += chunk["usage"]["completion_tokens"]
                if first is not None:
                    with lock:
                        ttfts.append(first)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    queue = QueueSampler(url, metrics_key)
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    queue.stop()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    ttfts.sort()
    return {
        "requests": args.requests,
        "completion_tokens": tokens[0],
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens[0] / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
        **queue.summary(),
    }


class QueueSampler:
    """Samples vLLM's running and waiting request gauges from /metrics twice a second during a phase, so
    a report shows whether batches were as large with adapters as without (a slot limit would show as
    requests waiting). Best effort: a failed scrape is skipped, never fails the phase."""

    GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting")

    def __init__(self, url: str, key: str | None = None, every: float = 0.5) -> None:
        self.url, self.every = url, every
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.samples: dict[str, list[float]] = {g: [] for g in self.GAUGES}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with httpx.Client(timeout=5) as client:
                while not self._done.wait(self.every):
                    try:
                        text = client.get(self.url + "/metrics", headers=self.headers).text
                    except httpx.HTTPError:
                        continue
                    for gauge in self.GAUGES:
                        values = [
                            float(line.rsplit(" ", 1)[1])
                            for line in text.splitlines()
                            if line.startswith(gauge + "{") or line.startswith(gauge + " ")
                        ]
                        if values:
                            self.samples[gauge].append(sum(values))
        except Exception:  # noqa: BLE001 - a diagnostic, never the measurement
            return

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=10)

    def summary(self) -> dict:
        out = {}
        for gauge, key in zip(self.GAUGES, ("running_mean", "waiting_mean"), strict=True):
            vals = self.samples[gauge]
            if vals:
                out[key] = round(statistics.mean(vals), 1)
        return out


def first_token_s(url: str, key: str | None, model: str, expect_model: str | None = None) -> float:
    """Seconds from now to the first streamed token (optionally: from the named model version)."""
    body = {"model": model, "prompt": [5, 6, 7, 8], "max_tokens": 2, "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=headers, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if expect_model and chunk["model"] != expect_model:
                    raise RuntimeError(f"served {chunk['model']}, expected {expect_model}")
                return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def probe_cost_us(db: Path, n: int = 20000) -> dict:
    """What a request pays to notice an alias move made by another process: one `PRAGMA data_version`."""
    reader = TenantStore.open(db)
    t0 = time.perf_counter()
    for _ in range(n):
        reader.data_version()
    probe = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(200):
        reader.all_aliases()
    reload = (time.perf_counter() - t0) / 200
    reader.close()
    return {"data_version_probe": round(probe * 1e6, 2), "reload_all_aliases": round(reload * 1e6, 1)}


def _best_threads(model, prompt_len: int) -> int:
    """Give the naive path its best torch thread count: on a busy machine OpenMP threads that spin
    waiting for each other can make 2 threads many times slower than 1."""
    import torch

    ids = torch.randint(3, VOCAB_IDS, (1, prompt_len))
    timings = {}
    for n in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(n)
        with torch.no_grad():
            model(input_ids=ids)
            t0 = time.perf_counter()
            for _ in range(3):
                model(input_ids=ids)
        timings[n] = time.perf_counter() - t0
    best = min(timings, key=timings.get)
    torch.set_num_threads(best)
    return best


def naive_phase(base: Path, adapters: list[Path], args: argparse.Namespace) -> dict:
    """transformers + peft: all adapters in one PeftModel, `set_adapter` then `generate` per request."""
    import torch
    from peft import PeftModel
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    names = [f"n{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, d in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(d, adapter_name=name)
    threads = _best_threads(peft_model, args.prompt_len)
    rng = random.Random(7)
    tokens, ttfts = 0, []
    t0 = time.perf_counter()
    for i in tqdm(range(args.naive_requests), desc="naive", unit="req"):
        peft_model.set_adapter(names[i % len(names)])
        ids = torch.tensor([[rng.randrange(3, VOCAB_IDS) for _ in range(args.prompt_len)]])
        s = time.perf_counter()
        with torch.no_grad():
            peft_model.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttfts.append(time.perf_counter() - s)
        with torch.no_grad():
            out = peft_model.generate(
                input_ids=ids, max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False
            )
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - t0 - sum(ttfts)  # the TTFT probes are not part of the throughput
    ttfts.sort()
    return {
        "requests": args.naive_requests,
        "adapters": len(adapters),
        "torch_threads": threads,
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p99_ms": round(1000 * ttfts[-1], 1),
    }
