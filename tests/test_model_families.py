"""Your own model: small random-init bases of each family, built with transformers, trained with LoRA and
QLoRA, then packed and verified as bundles (the bundles' public API).

The embedded base's tokenizer (and chat template) is copied into each directory, as a newcomer with a
model of their own would have a tokenizer beside it. Random weights: nothing here measures learning,
only that every family trains, saves an adapter peft reloads, and packs against its own base.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from adapterhub_lite.base import EMBEDDED_BASE_DIR
from adapterhub_lite.examples import EXAMPLES_DIR
from adapterhub_lite.training import recipe_from_dict, train

# Random weights: an adapter trained 2 steps is often no better than the base; that warning is expected.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:NEGATIVE TRANSFER")]

VOCAB = 1454  # the embedded tokenizer's size
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=256, vocab_size=VOCAB)  # fmt: skip


def _config(family: str):
    import transformers as tf

    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if family == "llama":
        return tf.LlamaConfig(**SMALL, **ids)
    if family == "qwen2":
        return tf.Qwen2Config(**SMALL, **ids, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**SMALL, **ids, sliding_window=None)
    if family == "gemma":
        return tf.GemmaConfig(**SMALL, **ids, head_dim=32)
    if family == "phi3":
        return tf.Phi3Config(**SMALL, **ids)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=256, vocab_size=VOCAB, **ids)
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2"]
# GPT-2's Conv1D weights are [in, out]: packing it is the bundles' compatibility check's to handle.
PACKED = [f for f in FAMILIES if f != "gpt2"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        d = root / family
        AutoModelForCausalLM.from_config(_config(family)).save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(EMBEDDED_BASE_DIR / f, d / f)
        out[family] = d
    return out


@pytest.fixture(scope="module")
def trained(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("family-adapters")
    runs = {}

    def get(family: str, method: str):
        if (family, method) not in runs:
            recipe = recipe_from_dict({
                "data": str(EXAMPLES_DIR / "antonyms" / "data.jsonl"), "base": str(bases[family]),
                "method": method, "max_steps": 2, "batch_size": 4, "max_seq_len": 32, "eval_fraction": 0.1,
                "max_new_tokens": 2, "learning_rate": 1e-3, "output_dir": str(root / f"{family}-{method}"),
            })  # fmt: skip
            runs[family, method] = train(recipe, progress=False)
        return runs[family, method]

    return get


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_and_peft_reloads_it(bases, trained, family, method):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = trained(family, method)
    rec = run.record
    assert rec["method"] == method and rec["base"]["name"] == family and rec["steps"] == 2
    assert all(x == x for x in (rec["final_train_loss"], rec["metrics"]["adapter"]["loss"]))  # not NaN
    config = json.loads((run.output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == family
    if method == "lora":  # Conv1D weights are [in, out] (a 4-bit load turns them into Linear4bit)
        assert config["fan_in_fan_out"] is (family == "gpt2")
    weights = load_file(run.output_dir / "adapter_model.safetensors")
    assert weights and any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # it moved
    base = AutoModelForCausalLM.from_pretrained(bases[family])
    model = PeftModel.from_pretrained(base, str(run.output_dir))
    loaded = {k for k, _ in model.named_parameters() if "lora_" in k}
    assert len(loaded) == len(weights)


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("family", PACKED)
def test_each_family_packs_and_verifies_against_its_base(bases, trained, tmp_path, family, method):
    from adapterhub_lite.base import fingerprint
    from adapterhub_lite.bundles import pack_bundle, verify_bundle

    run = trained(family, method)
    bundle = pack_bundle(run.output_dir, tmp_path / "bundle", namespace="acme", name=f"{family}-{method}",
                         version="1.0.0", base_dir=bases[family])  # fmt: skip
    manifest = verify_bundle(bundle, base_dir=bases[family], vllm_check=False)
    assert manifest.base.fingerprint == fingerprint(bases[family])
