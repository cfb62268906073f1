"""A base of another family than the embedded Llama, served for real: a small random-init Qwen2 (tied
embeddings, q/k/v biases), its bundle published and resolved by the plugin in a vLLM CPU server, and the
served greedy tokens and their logprobs compared with plain peft offline.

Random weights with `initializer_range` 0.2 (not 0.02) give logits of order 10 with top-2 gaps above
0.01 on this prompt; both sides compute in float32 (the launcher passes `--dtype float32`), where the
two implementations differ by about 1e-4 at that scale, so equal tokens are a fair demand, and the
logprob tolerance (2e-3) is an order above that difference and far below any gap that flips a token.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

PROMPT_IDS = [5, 120, 240, 360, 480, 600]
N_TOKENS = 6
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
LOGPROB_TOL = 2e-3
MIN_GAP = 1e-2


def _qwen2_base(out: Path) -> Path:
    """A 2-layer Qwen2 (head_dim 64, which vLLM's CPU attention takes) with the embedded tokenizer."""
    import torch
    import transformers

    from adapterhub_lite.base import EMBEDDED_BASE_DIR

    config = transformers.Qwen2Config(
        vocab_size=1454,  # the embedded tokenizer's size
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(EMBEDDED_BASE_DIR / name, out / name)
    return out


def _offline(base: Path, adapter_out: Path) -> dict[str, tuple[list[int], list[float], float]]:
    """Greedy tokens, their logprobs and the smallest top-2 logit gap: base alone and base + adapter."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    def fresh():
        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def greedy(model):
        ids, logprobs, gap = torch.tensor([PROMPT_IDS]), [], float("inf")
        with torch.no_grad():
            for _ in range(N_TOKENS):
                logits = model(input_ids=ids).logits[0, -1]
                top = logits.topk(2).values
                gap = min(gap, float(top[0] - top[1]))
                nxt = logits.argmax()
                logprobs.append(float(torch.log_softmax(logits, -1)[nxt]))
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        return ids[0, len(PROMPT_IDS) :].tolist(), logprobs, gap

    out = {"base": greedy(fresh())}
    peft_model = get_peft_model(fresh(), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(1)
    for name, p in peft_model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    peft_model.save_pretrained(adapter_out)
    out["adapter"] = greedy(PeftModel.from_pretrained(fresh(), adapter_out).eval())
    return out


@pytest.fixture(scope="module")
def qwen2_server(tmp_path_factory):
    from adapterhub_lite.bundles import pack_bundle
    from adapterhub_lite.registry import open_registry
    from adapterhub_lite.serving.supervisor import ServeOptions, VLLMServer
    from adapterhub_lite.tenants import TenantStore

    root = tmp_path_factory.mktemp("qwen2-serving")
    base = _qwen2_base(root / "qwen2-tiny")
    expected = _offline(base, root / "adapter")
    bundle = pack_bundle(
        root / "adapter", root / "bundle", namespace="acme", name="qwen-bot", version="1.0.0", base_dir=base
    )
    ref = open_registry(root / "registry").publish(bundle).ref
    store = TenantStore.open(root / "tenants.db")
    _, key = store.add_tenant("acme", base_access=True)
    store.set_alias("acme", "bot", ref)
    opts = ServeOptions(
        base_dir=str(base),
        served_name="base",
        registry=str(root / "registry"),
        tenants_db=str(root / "tenants.db"),
        cache_dir=str(root / "cache"),
        max_loras=1,
        max_cpu_loras=2,
        max_lora_rank=8,
        max_model_len=128,
        log_path=str(root / "vllm.log"),
    )
    server = VLLMServer(opts, startup_timeout=900).start()  # the shared 2-core machine is slow
    try:
        yield {"url": server.url, "key": key, "ref": ref, "expected": expected}
    finally:
        server.stop()


def test_qwen2_adapter_served_equals_offline_peft(qwen2_server):
    expected = qwen2_server["expected"]
    assert expected["adapter"][0] != expected["base"][0], "the adapter must change the output"
    client = openai.OpenAI(base_url=qwen2_server["url"] + "/v1", api_key=qwen2_server["key"], max_retries=0)
    for model, which in (("bot", "adapter"), ("base", "base")):
        tokens, logprobs, gap = expected[which]
        assert gap > MIN_GAP, f"{which}: a top-2 gap of {gap:.2e} is too close to call"
        r = client.completions.create(
            model=model,
            prompt=PROMPT_IDS,
            max_tokens=N_TOKENS,
            temperature=0,
            logprobs=1,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        if which == "adapter":
            assert r.model == qwen2_server["ref"]  # the plugin resolved the alias to the bundle
        assert r.choices[0].token_ids == tokens
        served = r.choices[0].logprobs.token_logprobs
        assert max(abs(a - b) for a, b in zip(served, logprobs, strict=True)) < LOGPROB_TOL
