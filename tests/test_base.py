"""The base-model part: fingerprints and loading (full precision and real bitsandbytes NF4)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from needs import missing
from safetensors.torch import load_file, save_file

from adapterhub_lite.base import EMBEDDED_BASE_DIR, fingerprint, load_base, load_tokenizer, resolve_base_dir
from adapterhub_lite.base.pretrain import PretrainConfig, build_model, train_tokenizer
from adapterhub_lite.base.world import source_documents
from adapterhub_lite.errors import BaseModelError


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-base")
    cfg = PretrainConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2)
    tok = train_tokenizer(list(source_documents(200)), cfg.vocab_size)
    build_model(cfg, tok).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_fingerprint_is_stable_and_shaped(tiny_model_dir, tmp_path):
    fp = fingerprint(tiny_model_dir)
    assert fp.startswith("sha256:") and len(fp) == len("sha256:") + 64
    assert fingerprint(tiny_model_dir) == fp
    # A copy elsewhere (another path, other mtimes) has the same fingerprint.
    assert fingerprint(_copy(tiny_model_dir, tmp_path / "copy")) == fp


def test_fingerprint_changes_when_any_weight_changes(tiny_model_dir, tmp_path):
    fp = fingerprint(tiny_model_dir)
    tensors = load_file(tiny_model_dir / "model.safetensors")
    for name in sorted(tensors)[:: max(1, len(tensors) // 4)]:
        d = _copy(tiny_model_dir, tmp_path / name.replace(".", "_"))
        changed = dict(tensors)
        changed[name] = tensors[name].clone()
        changed[name].view(-1)[0] += 1e-3
        save_file(changed, d / "model.safetensors", metadata={"format": "pt"})
        assert fingerprint(d) != fp, f"changing {name} did not change the fingerprint"


def test_fingerprint_ignores_tensor_order_and_saver_version(tiny_model_dir, tmp_path):
    fp = fingerprint(tiny_model_dir)
    d = _copy(tiny_model_dir, tmp_path / "reordered")
    tensors = load_file(d / "model.safetensors")
    # Split into two shards with another tensor order: the same weights.
    names = sorted(tensors, reverse=True)
    (d / "model.safetensors").unlink()
    save_file({n: tensors[n] for n in names[::2]}, d / "model-00001-of-00002.safetensors")
    save_file({n: tensors[n] for n in names[1::2]}, d / "model-00002-of-00002.safetensors")
    cfg = json.loads((d / "config.json").read_text())
    cfg["transformers_version"] = "0.0.0"
    (d / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(d) == fp


def test_fingerprint_changes_with_config_or_tokenizer(tiny_model_dir, tmp_path):
    fp = fingerprint(tiny_model_dir)
    d = _copy(tiny_model_dir, tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-3
    (d / "config.json").write_text(json.dumps(cfg))
    assert fingerprint(d) != fp
    d2 = _copy(tiny_model_dir, tmp_path / "tok")
    tok = json.loads((d2 / "tokenizer.json").read_text())
    # A change the tokenizer still loads with (a new token id past the embeddings is refused by check_base).
    tok["model"]["dropout"] = 0.5
    (d2 / "tokenizer.json").write_text(json.dumps(tok))
    assert fingerprint(d2) != fp


def test_missing_or_non_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(BaseModelError, match="not found"):
        resolve_base_dir(tmp_path / "nope")
    with pytest.raises(BaseModelError, match="config.json"):
        resolve_base_dir(tmp_path)


def test_nf4_loading_quantizes_linear_layers(tiny_model_dir):
    import bitsandbytes as bnb

    model = load_base(tiny_model_dir, quantization="nf4", device="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4"
    full = load_base(tiny_model_dir, device="cpu")
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        a, b = model(ids).logits, full(ids).logits
    # 4-bit weights approximate the originals: close, but not identical.
    assert not torch.equal(a, b)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def _transformers_nf4(model_dir):
    """transformers' own 4-bit load (memory-maps the whole file): the reference the lean loader must match."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, dtype=torch.float32,
                                                quantization_config=q, device_map={"": "cpu"})


@pytest.mark.parametrize("sharded", [False, True])
def test_lean_nf4_loading_matches_transformers_own(tiny_model_dir, tmp_path, sharded):
    model_dir = tiny_model_dir
    if sharded:
        model_dir = tmp_path / "sharded"
        load_base(tiny_model_dir, device="cpu").save_pretrained(model_dir, max_shard_size="100KB")
        for f in tiny_model_dir.glob("*token*"):
            shutil.copy(f, model_dir)
        assert len(list(model_dir.glob("*.safetensors"))) > 1
    ours, ref = load_base(model_dir, quantization="nf4", device="cpu"), _transformers_nf4(model_dir)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ref(ids).logits)
    assert ours.config.to_dict() == ref.config.to_dict()
    assert ours.generation_config.to_dict() == ref.generation_config.to_dict()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # still tied


_PEAK_RSS_SCRIPT = """
import gc, json, sys
from adapterhub_lite.base import load_base
# VmHWM, not ru_maxrss: the latter survives exec and starts at the spawning (pytest) process's RSS.
kib = lambda key: next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key + ":"))
load_base(sys.argv[1], quantization="nf4", device="cpu")  # warm-up: bitsandbytes' and torch's lazy setup
gc.collect()
base = kib("VmRSS")
model = load_base(sys.argv[2], quantization="nf4", device="cpu")
peak = kib("VmHWM")
print(json.dumps({"above_mib": (peak - base) / 1024, "weights_mib": model.get_memory_footprint() / 2**20}))
"""


@pytest.mark.slow  # writes a 130 MB model and loads it in a child process
def test_nf4_loading_peak_memory_is_not_the_whole_fp32_file(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    tok = load_tokenizer(tiny_model_dir)
    cfg = PretrainConfig(vocab_size=300, hidden_size=512, intermediate_size=1536, num_hidden_layers=10,
                         num_attention_heads=8)
    build_model(cfg, tok).save_pretrained(tmp_path / "big")
    tok.save_pretrained(tmp_path / "big")
    file_mib = (tmp_path / "big" / "model.safetensors").stat().st_size / 2**20
    assert file_mib > 100
    # A fixed mmap threshold: glibc's adaptive one keeps freed tensors' heap (tens of MiB, varying), which
    # measures the allocator, not the loader.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS_SCRIPT, str(tiny_model_dir), str(tmp_path / "big")],
                         capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    # transformers' own load peaks above the whole file (~150 MiB here); ours at the 4-bit weights (~19 MiB)
    # plus about one fp32 tensor (3 MiB) and small change.
    assert r["above_mib"] < 0.4 * file_mib, r
    assert r["above_mib"] < r["weights_mib"] + 25, r


def test_embedded_base_is_pretrained_and_knows_its_world():
    if not EMBEDDED_BASE_DIR.is_dir():
        missing("the embedded base is not built (make base)")
    report = json.loads((EMBEDDED_BASE_DIR / "pretraining.json").read_text())
    assert report["heldout_loss"] < report["random_init_heldout_loss"] / 2
    tok = load_tokenizer(None)
    model = load_base(None, device="cpu")
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert "{% for message in messages %}" in tok.chat_template


@pytest.mark.slow
def test_pretraining_reproduces_bit_for_bit_and_learns(tmp_path):
    from adapterhub_lite.base.pretrain import pretrain

    cfg = PretrainConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, n_docs=400, eval_docs=50, steps=15, batch_size=8, seq_len=64)
    quiet = lambda *_: None  # noqa: E731
    torch.set_num_threads(2)
    a = pretrain(tmp_path / "a", cfg, log=quiet)
    b = pretrain(tmp_path / "b", cfg, log=quiet)
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")
    assert a["heldout_loss"] == b["heldout_loss"]
    assert a["heldout_loss"] < a["random_init_heldout_loss"] - 0.2


# --- a base is checked before any work starts ----------------------------------------------------------


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer (tokenizer.json, tokenizer.model"),
        (lambda d: (d / "model.safetensors").unlink(), "has no weights (model.safetensors or pytorch_model"),
        (lambda d: (d / "config.json").write_text("{oops"), "config.json: not valid JSON"),
        (lambda d: (d / "config.json").write_text("{}"), "config.json: no 'model_type'"),
        (lambda d: (d / "tokenizer.json").write_text("{}"), "tokenizer.json: not a usable tokenizer"),
        (
            lambda d: (d / "config.json").write_text(
                json.dumps({**json.loads((d / "config.json").read_text()), "vocab_size": 100})
            ),
            "the tokenizer has ids up to 299 but the model has 100 embedding rows",
        ),
    ],
    ids=["no-tokenizer", "no-weights", "config-not-json", "no-model-type", "bad-tokenizer", "ids-past-vocab"],
)
def test_unusable_bases_are_refused_in_one_line(tiny_model_dir, tmp_path, breakage, message):
    d = _copy(tiny_model_dir, tmp_path / "broken")
    breakage(d)
    with pytest.raises(BaseModelError) as err:
        resolve_base_dir(d)
    assert message in err.value.message and "\n" not in err.value.message


def test_a_missing_shard_is_named(tiny_model_dir, tmp_path):
    d = _copy(tiny_model_dir, tmp_path / "sharded")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(BaseModelError, match="lacks weight shard.*model-00002-of-00002.safetensors"):
        resolve_base_dir(d)


def test_train_refuses_a_base_without_tokenizer_before_writing_anything(tiny_model_dir, tmp_path):
    from adapterhub_lite.training import recipe_from_dict, train

    d = _copy(tiny_model_dir, tmp_path / "no-tok")
    (d / "tokenizer.json").unlink()
    (tmp_path / "d.jsonl").write_text('{"prompt": "a", "completion": " b"}\n' * 4)
    recipe = recipe_from_dict(
        {"data": str(tmp_path / "d.jsonl"), "base": str(d), "output_dir": str(tmp_path / "o")}
    )
    with pytest.raises(BaseModelError, match="has no tokenizer"):
        train(recipe, progress=False)
    assert not (tmp_path / "o").exists()


def test_base_info_counts_the_tokenizer():
    # What `base info` imports (no torch) is checked in tests/test_cli_imports.py.
    from adapterhub_lite.base.info import describe_base

    info = describe_base(None)
    assert info["name"] == "ahl-tiny-llama" and info["tokenizer_size"] == info["vocab_size"] == 1454
    assert info["fingerprint"] == fingerprint(EMBEDDED_BASE_DIR)
