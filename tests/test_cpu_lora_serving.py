"""The grouped CPU LoRA path inside a real vLLM server: many adapters, every slot in use, base requests in
the same batches, long prompts being prefilled while short ones decode; greedy tokens must equal
transformers + peft offline, row by row.

With every slot in use, vLLM 0.32's own CPU reference would give the base requests the last slot's
adapter; the grouped path must not. Run twice: with a slot per adapter, and with a third as many slots
and half as many cached adapters, so slots are rewritten and adapters re-read from disk between steps
(the grouped ops then refresh the prepared copy of only the slot written).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SLOTS = 12  # enough adapters that decode steps take the padded one-product-per-matrix path
NEW_TOKENS = 4


def _greedy(model, ids: list[int]) -> list[int]:
    import torch

    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            x = torch.cat([x, model(input_ids=x).logits[0, -1].argmax().view(1, 1)], dim=1)
    return x[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapterhub_lite.base import EMBEDDED_BASE_DIR

    root = tmp_path_factory.mktemp("cpu-lora-serving")
    base = Path(EMBEDDED_BASE_DIR)

    def fresh() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    # prompts: long (past the prefill grouping threshold) and short, one per request
    prompts = {
        f"a{i}": [(5 * j + 17 * i) % 900 + 3 for j in range(150 if i % 2 else 12)] for i in range(SLOTS)
    }
    prompts["base-long"] = [(3 * j + 11) % 900 + 3 for j in range(140)]
    prompts["base-short"] = [9, 8, 7, 6, 5]
    dirs, expected = {}, {}
    for i in range(SLOTS):
        name = f"a{i}"
        peft_model = get_peft_model(fresh(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
        gen = torch.Generator().manual_seed(100 + i)
        for pname, p in peft_model.named_parameters():
            if "lora_A" in pname or "lora_B" in pname:
                p.data = torch.randn(p.shape, generator=gen) * 0.3
        dirs[name] = root / name
        peft_model.save_pretrained(dirs[name])
        expected[name] = _greedy(PeftModel.from_pretrained(fresh(), dirs[name]).eval(), prompts[name])
    base_model = fresh()
    for name in ("base-long", "base-short"):
        expected[name] = _greedy(base_model, prompts[name])
    assert len({tuple(v) for v in expected.values()}) > SLOTS // 2, "adapters must change the output"

    return dirs, prompts, expected


# (slots, adapters kept loaded): every adapter in a slot of its own; or a third of them, so they rotate
@pytest.fixture(scope="module", params=[(SLOTS, SLOTS), (SLOTS // 3, SLOTS // 2)], ids=["slot-each", "churn"])
def served(adapters, request, tmp_path_factory):
    from adapterhub_lite.base import EMBEDDED_BASE_DIR
    from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer
    from adapterhub_lite.vllm_compat.launch import PLUGIN_NAME

    dirs, prompts, expected = adapters
    max_loras, max_cpu_loras = request.param
    root = tmp_path_factory.mktemp("cpu-lora-server")
    opts = ServeOptions(
        base_dir=str(EMBEDDED_BASE_DIR),
        served_name="base",
        plugin=False,
        lora_modules={n: str(d) for n, d in dirs.items()},
        max_loras=max_loras,
        max_cpu_loras=max_cpu_loras,
        max_lora_rank=16,
        max_model_len=256,
        log_path=str(root / "vllm.log"),
    )
    server = VLLMServer(opts)
    server.env["VLLM_PLUGINS"] = PLUGIN_NAME  # the grouped ops without the middleware
    server.env["ADAPTERHUB_LORA_TRACE"] = "1"
    server.start()
    try:
        yield server, prompts, expected, root / "vllm.log" if max_loras < len(dirs) else None
    finally:
        server.stop()


def test_every_slot_and_base_rows_in_one_batch_equal_offline_peft(served):
    server, prompts, expected, log = served
    got: dict[str, list[int]] = {}
    errors: list[str] = []

    def ask(name: str) -> None:
        body = {
            "model": "base" if name.startswith("base") else name,
            "prompt": prompts[name],
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=300)
        if r.status_code != 200:
            errors.append(f"{name}: {r.status_code} {r.text[:200]}")
            return
        got[name] = r.json()["choices"][0]["token_ids"]

    for _ in range(2):  # the second round runs with every slot already occupied
        got.clear()
        threads = [threading.Thread(target=ask, args=(name,)) for name in prompts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert got == expected
    if log is None:
        return
    # with slots rewritten, the trace's last line says the prepared copies followed one slot at a time
    trace = [line for line in log.read_text().splitlines() if "adapterhub trace:" in line]
    assert trace, "the seam's slot-write hook did not run"
    one_slot = int(re.search(r"(\d+) one-slot", trace[-1]).group(1))
    assert one_slot > 0, f"no slot write took the one-slot refresh: {trace[-1]}"
