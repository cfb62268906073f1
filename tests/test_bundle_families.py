"""Bundles across model families: pack and verify (shapes checked against the base) on small random-init
Llama, Qwen2, Mistral, Gemma, Gemma-2, Phi-3 and GPT-2 models built with transformers.

GPT-2 stores its attention and MLP weights as Conv1D, [in, out] (peft saves `fan_in_fan_out: true`):
its adapters pack and verify for use with peft, and are refused for vLLM serving with one line, since
vLLM 0.32 serves no LoRA on GPT-2. Phi-3 has fused `qkv_proj`/`gate_up_proj` layers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from adapterhub_lite.bundles import check_bundle, pack_bundle
from adapterhub_lite.errors import BundleError

SMALL = dict(
    vocab_size=400,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", SMALL, ["q_proj", "v_proj"]),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {**SMALL, "tie_word_embeddings": False},
        ["q_proj", "k_proj", "down_proj"],
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", SMALL, ["q_proj", "o_proj", "up_proj"]),
    "gemma": (
        "GemmaConfig",
        "GemmaForCausalLM",
        {**SMALL, "head_dim": 16},
        ["q_proj", "v_proj", "gate_proj"],
    ),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**SMALL, "head_dim": 16}, ["q_proj", "v_proj"]),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {**SMALL, "pad_token_id": 0},
        ["qkv_proj", "o_proj", "gate_up_proj"],
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=400, n_embd=64, n_layer=2, n_head=4, n_positions=128),
        ["c_attn", "c_proj", "c_fc"],
    ),
}


def _family(root: Path, tiny_base: Path, family: str) -> tuple[Path, Path]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    config_cls, model_cls, kwargs, targets = FAMILIES[family]
    base = root / family / "base"
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    model.save_pretrained(base)
    for f in tiny_base.iterdir():  # the test tokenizer (400 tokens), as a newcomer would copy one in
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, base / f.name)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapter = root / family / "adapter"
    peft_model.save_pretrained(adapter)
    return base, adapter


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_packs_and_verifies_against_its_base(family, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter = _family(tmp_path, tiny_base, family)
    warnings: list[str] = []
    bundle = pack_bundle(
        adapter,
        tmp_path / "bundle",
        namespace="acme",
        name=family,
        version="1.0.0",
        base_dir=base,
        on_warning=warnings.append,
    )
    result = check_bundle(bundle, base_dir=base)  # vLLM's own check included where vLLM is installed
    assert result.base_checked is not None and result.manifest.adapter.modules > 0
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), bundle)  # loads with peft
    if family == "gpt2":
        assert warnings == result.warnings and len(warnings) == 1
        assert "does not support LoRA adapters for GPT2LMHeadModel" in warnings[0]
        with pytest.raises(BundleError) as exc:
            check_bundle(bundle, base_dir=base, for_serving=True)
        assert "\n" not in exc.value.message
        assert "cannot be served by vLLM: vLLM 0.32" in exc.value.message
    else:
        assert warnings == [] and result.warnings == []
        check_bundle(bundle, base_dir=base, for_serving=True)


def test_conv1d_orientation_is_checked(tiny_base, tmp_path):
    """A GPT-2 adapter whose config lies about fan_in_fan_out, and a Llama adapter on a GPT-2 base."""
    import json

    base, adapter = _family(tmp_path, tiny_base, "gpt2")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "fan_in_fan_out": False}))
    with pytest.raises(
        BundleError, match=r"fan_in_fan_out is false, but base .* stores its layers as Conv1D"
    ):
        pack_bundle(
            adapter, tmp_path / "b", namespace="a", name="g", version="1.0.0", base_dir=base, vllm_check=False
        )
    llama_base, llama_adapter = _family(tmp_path, tiny_base, "llama")
    with pytest.raises(BundleError, match="fan_in_fan_out is false, but base"):
        pack_bundle(
            llama_adapter,
            tmp_path / "c",
            namespace="a",
            name="g",
            version="1.0.0",
            base_dir=base,
            vllm_check=False,
        )
